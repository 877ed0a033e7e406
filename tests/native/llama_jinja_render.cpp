// Render a chat template with llama.cpp's Jinja engine (common/jinja, the engine of llama-server --jinja).
// Reads {"template": str, "contexts": [{...}, ...]} as JSON on stdin; first writes "OK <n>\n" and the
// template's capabilities as llama-server detects them (jinja::caps_get, a JSON object of n bytes), then
// for each context "OK <n>\n" and the n bytes rendered, or "ERR <n>\n" and the n bytes of the error.
#include "json.h"
#include "jinja/lexer.h"
#include "jinja/parser.h"
#include "jinja/runtime.h"
#include "jinja/value.h"
#include "jinja/caps.h"

#include <cstdlib>
#include <iostream>
#include <iterator>

// common/json.cpp asserts through ggml's GGML_ASSERT; ggml itself is not linked.
extern "C" void ggml_abort(const char * file, int line, const char * fmt, ...) {
    std::cerr << file << ":" << line << ": assertion failed" << std::endl;
    std::abort();
}

static void emit(const char * status, const std::string & body) {
    std::cout << status << " " << body.size() << "\n" << body;
}

int main() {
    std::string input((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    common_json request = common_json::parse(input);
    std::string tmpl = request.at("template").get<std::string>();
    jinja::program program;
    try {
        jinja::lexer lexer;
        program = jinja::parse_from_tokens(lexer.tokenize(tmpl));
    } catch (const std::exception & err) {
        std::cerr << "template does not parse: " << err.what() << std::endl;
        return 2;
    }
    common_json caps = common_json::object();
    for (const auto & [name, value] : jinja::caps_get(program).to_map()) {
        caps[name] = value;
    }
    emit("OK", caps.dump());
    const common_json & contexts = request.at("contexts");
    for (size_t i = 0; i < contexts.size(); i++) {
        try {
            jinja::context ctx(tmpl);
            jinja::global_from_json(ctx, contexts.at(i), true);
            jinja::runtime runtime(ctx);
            emit("OK", jinja::runtime::gather_string_parts(runtime.execute(program))->as_string().str());
        } catch (const std::exception & err) {
            emit("ERR", err.what());
        }
    }
    return 0;
}
