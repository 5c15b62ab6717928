"""One source per setting: the declarations drive validation, recipe keys, CLI flags and the table in docs/cli.md."""
import dataclasses
import re
from pathlib import Path

import pytest

from gift_quant import GiftConfig, GiftError
from gift_quant.cli.flags import overrides
from gift_quant.cli.main import build_parser
from gift_quant.settings import specs
from gift_quant.train import TrainSettings, load_recipe
from gift_quant.train.recipe import recipe_keys

SETTINGS_DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def _default(f):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _doc_rows() -> dict[str, tuple[str, str]]:
    rows = {}
    for line in SETTINGS_DOC.read_text().splitlines():
        m = re.match(r"\| ((?:`\w+`(?:, )?)+) \| (.*?) \| (.*?) \|", line)
        if m:
            for name in re.findall(r"`(\w+)`", m.group(1)):
                rows[name] = (m.group(2), m.group(3))
    return rows


def test_docs_state_every_default_as_declared():
    rows = _doc_rows()
    for name, f in recipe_keys().items():
        assert name in rows, f"docs/cli.md settings table misses {name}"
        flag, default = rows[name]
        d = _default(f)
        assert default.split(" (")[0] == str(d), (name, default, d)  # "None (bundled)": a note after the value
        if f.metadata["flag"] and "..." not in flag:
            assert flag == f"`{f.metadata['flag']}`", (name, flag)


def test_every_flag_is_generated_from_a_declaration():
    a = build_parser().parse_args(["compress", "--output", "x"])
    for cls in (GiftConfig, TrainSettings):
        for name, f in specs(cls).items():
            if f.metadata["flag"]:
                assert getattr(a, name) is None  # unset: the recipe (or the declared default) decides
    assert overrides(a, GiftConfig, TrainSettings) == {}
    a = build_parser().parse_args(["compress", "--output", "x", "--salient", "7", "--lr", "0.5"])
    assert overrides(a, GiftConfig, TrainSettings) == {"n_salient": 7, "salient_ratio": None, "lr": 0.5}


def test_none_is_an_ordinary_recipe():
    builtin = Path(__file__).resolve().parents[1] / "recipes" / "none.yaml"
    a, b = load_recipe("none", device="cpu"), load_recipe(str(builtin), device="cpu")
    assert a.to_dict() == b.to_dict()
    assert a.config.to_dict() == {**GiftConfig().to_dict(), "recipe": "none"}  # the declared defaults
    # the declared defaults, with noise resolved to the method's own (none trains nothing: no noise)
    assert dataclasses.asdict(a.train) == dataclasses.asdict(TrainSettings(noise="none"))


@pytest.mark.parametrize("cls,field,value", [(GiftConfig, "calib_samples", True), (GiftConfig, "seq_len", 0),
                                             (GiftConfig, "damp_percent", 1.0), (TrainSettings, "lr", 0),
                                             (TrainSettings, "steps", 2.5), (TrainSettings, "noise", "pink"),
                                             (TrainSettings, "max_grad_norm", -1.0)])
def test_declared_range_is_enforced(cls, field, value):
    with pytest.raises(GiftError, match=rf"{cls.__name__}\.{field}\b"):
        cls(**{field: value})


def test_command_line_value_errors_name_the_flag():
    with pytest.raises(GiftError, match="--steps must be >= 1"):
        load_recipe("post", {"steps": 0}, device="cpu")


def test_accepted_types_are_the_annotations():
    f = specs(GiftConfig)
    assert f["metric_tau"].metadata["types"] == (str, int, float) and f["n_salient"].metadata["types"] == (int,)
    assert f["dataset"].metadata["types"] == (object,)  # Any
    for cls in (GiftConfig, TrainSettings):
        for name, spec in specs(cls).items():
            ann = spec.type.split(" | ")
            assert [t.__name__ for t in spec.metadata["types"]] == (["object"] if ann == ["Any"] else ann), name
    assert GiftConfig(metric_tau=2).metric_tau == "2"
    with pytest.raises(GiftError, match=r"metric_tau: must be str/int/float/null"):
        GiftConfig(metric_tau=[2])
