// What llama-server does with a chat template around the model (common/chat.cpp, the code llama-server
// calls): build the prompt for an OpenAI chat request, and parse the model's output back into content and
// tool calls with the parser it derived from the template.
// Reads {"template": str, "bos_token": str, "eos_token": str, "requests": [{"messages": [...], "tools":
// [...], "add_generation_prompt": bool, "parallel_tool_calls": bool, "output": str (optional)}]} as JSON
// on stdin; for each request writes "OK <n>\n" and n bytes of JSON {"prompt", "format", "message"} (the
// parsed output as an OpenAI message, when one was given), or "ERR <n>\n" and n bytes of the error.
#include "chat.h"
#include "json.h"
#include "llama.h"

#include <cstdarg>
#include <cstdlib>
#include <iostream>
#include <iterator>

// common/json.cpp and chat.cpp assert through ggml's GGML_ASSERT; ggml itself is not linked.
extern "C" void ggml_abort(const char * file, int line, const char * fmt, ...) {
    std::cerr << file << ":" << line << ": assertion failed" << std::endl;
    std::abort();
}

// libllama is not linked: with the template given and no model, llama-server's chat code reaches none of
// these (they read a loaded model, or render llama.cpp's built-in non-Jinja templates).
[[noreturn]] static void no_model(const char * what) {
    std::cerr << what << " needs a loaded model, which this driver has not" << std::endl;
    std::abort();
}
extern "C" {
int32_t llama_chat_apply_template(const char *, const llama_chat_message *, size_t, bool, char *, int32_t) { no_model("llama_chat_apply_template"); }
const char * llama_model_chat_template(const llama_model *, const char *) { no_model("llama_model_chat_template"); }
const llama_vocab * llama_model_get_vocab(const llama_model *) { no_model("llama_model_get_vocab"); }
int32_t llama_token_to_piece(const llama_vocab *, llama_token, char *, int32_t, int32_t, bool) { no_model("llama_token_to_piece"); }
llama_token llama_vocab_bos(const llama_vocab *) { no_model("llama_vocab_bos"); }
llama_token llama_vocab_eos(const llama_vocab *) { no_model("llama_vocab_eos"); }
bool llama_vocab_get_add_bos(const llama_vocab *) { no_model("llama_vocab_get_add_bos"); }
bool llama_vocab_get_add_eos(const llama_vocab *) { no_model("llama_vocab_get_add_eos"); }
}

static void emit(const char * status, const std::string & body) {
    std::cout << status << " " << body.size() << "\n" << body;
}

int main() {
    std::string input((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    common_json request = common_json::parse(input);
    common_chat_templates_ptr templates;
    try {
        templates = common_chat_templates_init(nullptr, request.at("template").get<std::string>(),
                                               request.value("bos_token", ""), request.value("eos_token", ""));
    } catch (const std::exception & err) {
        std::cerr << "template does not load: " << err.what() << std::endl;
        return 2;
    }
    for (const auto & req : request.at("requests")) {
        try {
            common_chat_templates_inputs inputs;
            inputs.messages = common_chat_msgs_parse_oaicompat(req.at("messages"));
            if (req.contains("tools") && !req.at("tools").empty()) {
                inputs.tools = common_chat_tools_parse_oaicompat(req.at("tools"));
            }
            inputs.add_generation_prompt = req.value("add_generation_prompt", true);
            inputs.parallel_tool_calls = req.value("parallel_tool_calls", true);
            inputs.use_jinja = true;
            common_chat_params params = common_chat_templates_apply(templates.get(), inputs);
            common_json out = {{"prompt", params.prompt}, {"format", common_chat_format_name(params.format)}};
            if (req.contains("output")) {
                common_chat_parser_params parser(params);
                if (!params.parser.empty()) {
                    parser.parser.load(params.parser);
                }
                common_chat_msg msg = common_chat_parse(req.at("output").get<std::string>(), false, parser);
                out["message"] = msg.to_json_oaicompat();
            }
            emit("OK", out.dump());
        } catch (const std::exception & err) {
            emit("ERR", err.what());
        }
    }
    return 0;
}
