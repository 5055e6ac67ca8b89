"""Recipes (qtool.pipeline.recipe + plan.decide/make_plan): parsing, validation, and the CLI on
real files, including the transformer recipe of docs/RECIPES.md on the sample weights."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qtool.core.schemes import QuantSpec, SpecError
from qtool.formats.shards import open_checkpoint
from qtool.pipeline.plan import QuantizeOptions, Rule, make_plan
from qtool.pipeline.recipe import RecipeError, load_recipe
from tests.conftest import ROOT, SAMPLE, header, run, write_checkpoint

ISSUE_EXAMPLE = """\
[[rule]]
match = "*norm*"
skip = true
[[rule]]
match = "*.mlp.*"
bits = 4
granularity = "group"
group_size = 64
range = "mse"
"""


def _recipe(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _manifest(out: Path) -> dict[str, dict]:
    return {t["name"]: t for t in json.loads((out / "qtool.json").read_text())["tensors"]}


def _doc_recipe() -> str:
    text = (ROOT / "docs" / "RECIPES.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
    return blocks[0]


# --------------------------------------------------------------------------- parsing


def test_issue_example_parses_to_rules_in_order(tmp_path):
    rules = load_recipe(_recipe(tmp_path, ISSUE_EXAMPLE))
    p = tmp_path / "r.toml"
    assert rules == (
        Rule("*norm*", skip=True, origin=f"{p} rule 1"),
        Rule("*.mlp.*", settings=(("bits", 4), ("granularity", "group"), ("group_size", 64),
                                  ("range", "mse")), origin=f"{p} rule 2"),
    )


def test_every_key_is_accepted(tmp_path):
    (rule,) = load_recipe(_recipe(tmp_path, """
[[rule]]
match = 're:^a\\.b$'
skip = false
scheme = "asymmetric"
bits = 3
granularity = "tensor"
group_size = 7
range = "percentile"
percentile = 99
"""))
    assert rule.match == r"re:^a\.b$" and rule.skip is False
    settings = dict(rule.settings)
    assert settings == {"scheme": "asymmetric", "bits": 3, "granularity": "tensor",
                        "group_size": 7, "range": "percentile", "percentile": 99.0}
    assert isinstance(settings["percentile"], float)
    assert QuantSpec().with_(**settings).as_dict()["percentile"] == 99.0


@pytest.mark.parametrize("body, fragments", [
    ('match = "x"\nbitz = 4', ["unknown key 'bitz'", "did you mean 'bits'"]),
    ('match = "x"\ngroup-size = 4', ["unknown key 'group-size'", "'group_size'"]),
    ('bits = 4', ["missing key 'match'"]),
    ('match = ""', ["match must not be empty"]),
    ('match = 3', ["match must be a string"]),
    ('match = "re:(unclosed"', ["not a valid regex"]),
    ('match = "x"\nbits = "4"', ["bits must be an integer", "'4'"]),
    ('match = "x"\nbits = true', ["bits must be an integer", "True"]),
    ('match = "x"\nbits = 4.0', ["bits must be an integer"]),
    ('match = "x"\nbits = 9', ["bits", "from 2 to 8", "9"]),
    ('match = "x"\nbits = 1', ["bits", "from 2 to 8"]),
    ('match = "x"\nskip = "yes"', ["skip must be true or false"]),
    ('match = "x"\nscheme = "int4"', ["scheme = 'int4' is not one of", "gnmt"]),
    ('match = "x"\nrange = "max"', ["range = 'max' is not one of", "mse"]),
    ('match = "x"\ngranularity = "row"', ["granularity = 'row'"]),
    ('match = "x"\ngroup_size = 0', ["group_size", "from 1 to 16777216"]),
    ('match = "x"\npercentile = 30', ["percentile", "(50, 100]"]),
    ('match = "x"\npercentile = "99"', ["percentile must be an integer or a number"]),
    ('match = "x"\nskip = true\nbits = 4', ["skip = true cannot be combined with bits"]),
    ('match = "x"\nscheme = "gnmt"\nbits = 4', ["gnmt is 8-bit only"]),
])
def test_bad_rule_is_a_clear_error(tmp_path, body, fragments):
    path = _recipe(tmp_path, '[[rule]]\nmatch = "ok"\n\n[[rule]]\n' + body + "\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert msg.startswith(f"{path} rule 2: "), msg  # rule 1 is fine: the error is in rule 2
    for f in fragments:
        assert f in msg, (f, msg)


@pytest.mark.parametrize("text, fragment", [
    ("[[rule]]\nmatch = \n", "not valid TOML"),
    ('[rule]\nmatch = "x"\n', "write [[rule]], not [rule]"),
    ('# nothing\n', "no rules"),
    ('bits = 4\n[[rule]]\nmatch = "x"\n', "unknown key 'bits'"),
    ('rule = ["x"]\n', "rule 1: must be a table"),
])
def test_malformed_file_is_a_clear_error(tmp_path, text, fragment):
    path = _recipe(tmp_path, text)
    with pytest.raises(RecipeError, match=re.escape(fragment)) as e:
        load_recipe(path)
    assert str(e.value).startswith(str(path))


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(RecipeError, match=r"nope\.toml: cannot read recipe"):
        load_recipe(tmp_path / "nope.toml")
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'[[rule]]\nmatch = "caf\xe9"\n')
    with pytest.raises(RecipeError, match="latin1.toml: recipe is not UTF-8"):
        load_recipe(bad)
    assert issubclass(RecipeError, SpecError)  # so the CLI maps it to exit 2


# --------------------------------------------------------------------------- plan logic


def _plan(rules: tuple[Rule, ...], allow: bool = False, **spec: object):
    ckpt = open_checkpoint(SAMPLE)
    opts = QuantizeOptions(spec=QuantSpec(**spec), rules=rules, allow_unused_rules=allow)
    plan = make_plan(ckpt, opts)
    return plan, {info.name: (s, r) for info, s, r in plan.items}


def test_first_matching_rule_wins_and_cli_fills_the_rest(tmp_path):
    rules = load_recipe(_recipe(tmp_path, r"""
[[rule]]
match = "model.layers.0.mlp.up_proj.weight"
bits = 6
[[rule]]
match = 're:mlp\.(up|gate)_proj'
bits = 3
granularity = "group"
[[rule]]
match = "*embed*"
skip = true
"""))
    plan, by_name = _plan(rules, scheme="asymmetric", group_size=32, range="percentile",
                          percentile=99.5)
    cli = QuantSpec("asymmetric", group_size=32, range="percentile", percentile=99.5)
    assert by_name["model.layers.0.mlp.up_proj.weight"] == (cli.with_(bits=6), None)
    for n in ("model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        assert by_name[n] == (cli.with_(bits=3, granularity="group"), None), n
    # a BF16 tensor: --scale-dtype auto (the default) stores its scales in bfloat16
    assert by_name["model.layers.1.mlp.gate_proj.weight"] == (
        cli.with_(bits=3, granularity="group", scale_dtype="bfloat16"), None)
    assert by_name["model.layers.0.mlp.down_proj.weight"] == (cli, None)
    assert by_name["model.embed_tokens.weight"] == (None, "recipe rule '*embed*': skip")
    assert plan.warnings == []


def test_regex_is_searched_not_anchored_and_glob_is_whole_name():
    glob = Rule("mlp")  # a glob must match the whole name: this matches nothing
    regex = Rule("re:mlp")  # a regex may match anywhere
    assert not any(glob.matches(i.name) for i in open_checkpoint(SAMPLE).tensors())
    assert regex.matches("model.layers.0.mlp.up_proj.weight")
    assert Rule("*.MLP.*").matches("a.mlp.b") is False  # case-sensitive


def test_unused_and_shadowed_rules(tmp_path):
    path = _recipe(tmp_path, """
[[rule]]
match = "*mlp*"
bits = 4
[[rule]]
match = "*up_proj*"
bits = 2
[[rule]]
match = "*no_such_tensor*"
bits = 2
""")
    rules = load_recipe(path)
    with pytest.raises(SpecError, match=re.escape(
            f"{path} rule 2 (match '*up_proj*') matches no tensor (use --allow-unused-rules")):
        _plan(rules)
    plan, by_name = _plan(rules, allow=True)
    assert plan.warnings == [f"{path} rule 2 (match '*up_proj*') matches no tensor",
                             f"{path} rule 3 (match '*no_such_tensor*') matches no tensor"]
    assert by_name["model.layers.0.mlp.up_proj.weight"][0].bits == 4


def test_rule_contradicting_the_command_line_names_rule_and_tensor(tmp_path):
    path = _recipe(tmp_path, '[[rule]]\nmatch = "*.mlp.*"\nbits = 4\n')
    with pytest.raises(SpecError, match=re.escape(
            f"{path} rule 1 (match '*.mlp.*') on tensor 'model.layers.0.mlp.act_scale': "
            "scheme gnmt is 8-bit only")):
        _plan(load_recipe(path), scheme="gnmt")


# --------------------------------------------------------------------------- CLI, real files


def test_issue_example_through_the_cli(tmp_path):
    recipe = _recipe(tmp_path, ISSUE_EXAMPLE)
    out = tmp_path / "out"
    run("quantize", SAMPLE, out, "--recipe", recipe, "--scheme", "asymmetric", "-q")
    m = _manifest(out)
    h = header(out / "sample.safetensors")
    mlp = [n for n in m if ".mlp." in n]
    assert len(mlp) == 7
    for n in mlp:
        t = m[n]
        assert {k: t[k] for k in ("scheme", "bits", "granularity", "group_size", "range")} == {
            "scheme": "asymmetric", "bits": 4, "granularity": "group", "group_size": 64,
            "range": "mse"}, n
        rows, cols = t["shape"][0], t["shape"][1]
        assert t["packed"] is True and t["stored_shape"] == [rows, -(-cols * 4 // 8)]
        assert t["param_shape"] == [rows, -(-cols // 64)]
        assert h[n]["dtype"] == "U8" and h[n]["shape"] == t["stored_shape"]
    for n, t in m.items():
        if "norm" in n:
            assert "passthrough" in t, n  # 1-D norms are kept whatever the rule says
        elif ".mlp." not in n and "passthrough" not in t:
            # No rule: the command line's settings, 8-bit and unpacked.
            assert (t["scheme"], t["bits"], t["granularity"], t["range"], t["packed"]) == (
                "asymmetric", 8, "channel", "minmax", False), n
            assert "group_size" not in t


def test_recipe_skip_keeps_tensor_bit_for_bit(tmp_path):
    recipe = _recipe(tmp_path, '[[rule]]\nmatch = "*embed_tokens*"\nskip = true\n')
    out = tmp_path / "out"
    run("quantize", SAMPLE, out, "--recipe", recipe, "-q")
    t = _manifest(out)["model.embed_tokens.weight"]
    assert t["passthrough"] == "recipe rule '*embed_tokens*': skip"
    from safetensors import safe_open

    with safe_open(str(SAMPLE), "numpy") as a, safe_open(str(out / "sample.safetensors"),
                                                         "numpy") as b:
        x, y = a.get_tensor("model.embed_tokens.weight"), b.get_tensor("model.embed_tokens.weight")
    assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


@pytest.mark.parametrize("text, args, fragments", [
    ('[[rule]]\nmatch = "*mlp*"\nbitz = 4\n', [], ["rule 1: unknown key 'bitz'"]),
    ('[[rule]]\nmatch = "*mlp*"\nbits = 12\n', [], ["rule 1: bits", "from 2 to 8"]),
    ('[[rule]]\nmatch = "*nothing*"\nbits = 4\n', [],
     ["rule 1 (match '*nothing*') matches no tensor", "--allow-unused-rules"]),
    ('[[rule]]\nmatch = "*mlp*"\nbits = 4\n', ["--scheme", "gnmt"],
     ["rule 1 (match '*mlp*') on tensor 'model.layers.0.mlp.", "gnmt is 8-bit only"]),
    ("[[rule]\n", [], ["not valid TOML"]),
])
def test_bad_recipes_exit_2_one_line_nothing_written(tmp_path, text, args, fragments):
    recipe = _recipe(tmp_path, text)
    out = tmp_path / "out"
    r = run("quantize", SAMPLE, out, "--recipe", recipe, *args, expect=2)
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"qtool: error: {recipe}")
    for f in fragments:
        assert f in r.stderr, (f, r.stderr)
    assert "Traceback" not in r.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["r.toml"]


def test_missing_recipe_exit_2(tmp_path):
    r = run("quantize", SAMPLE, tmp_path / "out", "--recipe", tmp_path / "nope.toml", expect=2)
    assert r.stderr == f"qtool: error: {tmp_path / 'nope.toml'}: cannot read recipe " \
                       "(No such file or directory)\n"
    assert not (tmp_path / "out").exists()


def test_allow_unused_rules_warns_on_stderr(tmp_path):
    recipe = _recipe(tmp_path, '[[rule]]\nmatch = "*mlp*"\nbits = 4\n'
                               '[[rule]]\nmatch = "*[x]nothing*"\nbits = 2\n')
    out = tmp_path / "out"
    r = run("quantize", SAMPLE, out, "--recipe", recipe, "--allow-unused-rules", "--json")
    # One line, verbatim (the glob's brackets are not eaten as markup, the path not wrapped).
    assert f"qtool: warning: {recipe} rule 2 (match '*[x]nothing*') matches no tensor\n" \
        in r.stderr
    json.loads(r.stdout)  # stdout stays pure data
    assert _manifest(out)["model.layers.0.mlp.up_proj.weight"]["bits"] == 4
    quiet = run("quantize", SAMPLE, tmp_path / "out2", "--recipe", recipe,
                "--allow-unused-rules", "-q")
    assert quiet.stderr == ""


def test_docs_transformer_recipe_on_sample_weights(tmp_path):
    """The exact recipe printed in docs/RECIPES.md: embeddings and attention at 8 bits, the MLP
    at 4 bits with groups of 128; checked in the manifest and in the stored file."""
    recipe = _recipe(tmp_path, _doc_recipe(), "transformer.toml")
    out = tmp_path / "out"
    # --bits 2 on the command line: every rule sets its own width, so it must not leak in.
    run("quantize", SAMPLE, out, "--recipe", recipe, "--bits", "2", "-q")
    m = _manifest(out)
    h = header(out / "sample.safetensors")
    settings = {n: (t.get("bits"), t.get("granularity"), t.get("group_size"), t.get("range"))
                for n, t in m.items() if "passthrough" not in t}
    expected = {}
    for n in settings:
        if n == "model.embed_tokens.weight" or ".self_attn." in n:
            expected[n] = (8, "channel", None, "minmax")
        elif ".mlp." in n:
            expected[n] = (4, "group", 128, "mse")
    assert settings == expected
    assert len([n for n in expected if ".mlp." in n]) == 7
    assert len([n for n in expected if ".self_attn." in n]) == 9
    for n, (bits, *_rest) in expected.items():
        rows, cols = m[n]["shape"]
        stored = [rows, cols] if bits == 8 else [rows, cols // 2]
        assert h[n]["shape"] == stored, n
        off = h[n]["data_offsets"]
        assert off[1] - off[0] == stored[0] * stored[1], n
    restored = tmp_path / "restored.safetensors"
    run("dequantize", out, restored, "-q")
    assert restored.is_file()


def test_odd_width_rule_on_a_small_checkpoint(tmp_path):
    src = write_checkpoint(tmp_path / "m.safetensors")
    recipe = _recipe(tmp_path, '[[rule]]\nmatch = "*attn*"\nbits = 5\n')
    out = tmp_path / "out"
    run("quantize", src, out, "--recipe", recipe, "-q")
    t = _manifest(out)["layers.0.attn.q.weight"]
    assert (t["bits"], t["packed"], t["stored_shape"]) == (5, True, [32, 30])  # 48*5/8 = 30
