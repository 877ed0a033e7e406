import csv

import pytest

from calltune.sources import Rejects, SourceError, load_source
from calltune.sources.viggo import MRParseError, load_viggo, parse_mr, render_mr

from conftest import VIGGO


def test_round_trip_every_row_of_both_splits():
    n = 0
    for name, expected in (("train.csv", 5103), ("valid.csv", 714)):
        rejects = Rejects()
        examples = load_viggo(VIGGO / name, rejects=rejects)
        assert len(examples) == expected and len(rejects) == 0
        for ex in examples:
            assert render_mr(ex.messages[-1].tool_calls[0]) == ex.meta["mr"]
        n += len(examples)
    assert n == 5817


def test_parse_lists_and_empty_values():
    call = parse_mr("inform(name[Dirt: Showdown], genres[driving/racing, sport], platforms[PC], has_mac_release[])")
    assert call.name == "inform"
    assert call.arguments == {"name": "Dirt: Showdown", "genres": ["driving/racing", "sport"],
                              "platforms": ["PC"], "has_mac_release": ""}
    assert list(call.arguments) == ["name", "genres", "platforms", "has_mac_release"]


@pytest.mark.parametrize("bad", ["inform name[x]", "inform(name[x] genres[y])", "inform(name[x], name[y])",
                                 "inform(name[x", "inform(name[x], )"])
def test_parse_rejects_malformed(bad):
    with pytest.raises(MRParseError):
        parse_mr(bad)


def _write_csv(path, header, rows):
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_unparseable_rows_are_counted_and_written(tmp_path):
    path = _write_csv(tmp_path / "v.csv", ["mr", "ref"], [["request(specifier[terrible])", "Any terrible games?"],
                                                          ["inform(name[x]", "broken"],
                                                          ["confirm(name[Halo])", "Halo, right?"]])
    rejects = Rejects(tmp_path / "rejects.jsonl")
    examples = load_viggo(path, rejects=rejects)
    assert [e.row for e in examples] == [0, 2]
    assert len(rejects) == 1 and rejects.items[0]["row"] == 1 and "'mr'" in rejects.items[0]["reason"]
    rejects.write()
    assert '"row": 1' in (tmp_path / "rejects.jsonl").read_text()


def test_hub_layout_columns(tmp_path):
    path = _write_csv(tmp_path / "gem.csv", ["gem_id", "meaning_representation", "target"],
                      [["viggo-1", "request(release_year[2014], specifier[terrible])", "Any terrible games in 2014?"]])
    (ex,) = load_viggo(path)
    assert ex.messages[1].content == "Any terrible games in 2014?"
    assert ex.messages[2].tool_calls[0].arguments == {"release_year": "2014", "specifier": "terrible"}


def test_missing_column_names_file_and_field(tmp_path):
    path = _write_csv(tmp_path / "bad.csv", ["mr", "text"], [["request(specifier[x])", "y"]])
    with pytest.raises(SourceError, match=r"bad\.csv.*field 'ref'"):
        load_viggo(path)


def test_empty_file(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(SourceError, match=r"empty\.csv.*empty"):
        load_viggo(tmp_path / "empty.csv")


def test_unknown_source_suggests():
    with pytest.raises(ValueError, match="Did you mean 'viggo'"):
        load_source("vigo", VIGGO / "valid.csv")
