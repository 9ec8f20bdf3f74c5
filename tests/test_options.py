"""Options declared once (q3vl/options.py): every command's flags are the dataclass fields, with their
defaults; adding an option is one field; numbers are strictly typed; unknown names are refused. And
the item keys are declared once (q3vl/preprocess/items.py): every front end takes its keys from there.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from q3vl.errors import ConfigError, UnknownOptionError
from q3vl.options import add_flags, default_of, flag_of, from_args, numbers, opt, option_fields

# the commands that run or make a bundle, and the option dataclasses their flags come from
EXPECTED = {
    "embed": {"RuntimeOptions"}, "rerank": {"RuntimeOptions"}, "index build": {"RuntimeOptions"},
    "parity": {"RuntimeOptions"}, "bench": {"RuntimeOptions"}, "serve": {"ServeConfig"},
    "embed-dataset": {"DatasetOptions", "RuntimeOptions"}, "export": {"ExportRecipe"}, "quantize": {"QuantizeRecipe"},
}


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every `q3vl` subcommand's parser, by its name ("index build" for a nested one)."""
    from q3vl.cli import _register_more, build_parser

    _register_more()
    out: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{prefix} {name}".strip())
        if prefix:
            out[prefix] = parser

    walk(build_parser(), "")
    return out


def test_every_flag_default_is_its_fields_default_for_every_command(monkeypatch):
    monkeypatch.delenv("Q3VL_API_KEY", raising=False)
    parsers = command_parsers()
    seen: dict[str, set[str]] = {}
    checked = 0
    for name, parser in parsers.items():
        by_dest = {a.dest: a for a in parser._actions}
        for defaults, only in getattr(parser, "q3vl_options", []):
            cls = type(defaults)
            seen.setdefault(name, set()).add(cls.__name__)
            assert defaults == cls(), f"{name}: {cls.__name__} flags start from other defaults than its fields'"
            for f in option_fields(cls):
                if not f.metadata["cli"] or (only is not None and f.name not in only):
                    continue
                action = by_dest[f.name]
                assert flag_of(f) in action.option_strings, (name, f.name)
                want = None if f.metadata["append"] else default_of(cls, f.name)
                assert action.default == want, f"{name} {flag_of(f)}: flag default {action.default!r}, field {want!r}"
                checked += 1
    assert seen == EXPECTED
    assert checked > 100
    # ... and a parsed empty command line gives back exactly the declared defaults
    from q3vl.runtime.options import RuntimeOptions
    from q3vl.serve.config import ServeConfig

    assert from_args(parsers["embed"].parse_args(["b", "i.jsonl", "-o", "v.npy"]), RuntimeOptions()) == RuntimeOptions()
    assert from_args(parsers["serve"].parse_args([]), ServeConfig()) == ServeConfig()


ENGINE_LIMITS = {"max_frames"}  # `trt build` / `export --tensorrt`: the engine profile's limit, another option


def test_runtime_flags_and_fields_are_the_same_names_everywhere():
    """A flag named like a runtime or media option is that option (no second, hand-written copy)."""
    from q3vl.preprocess.media_options import MediaOptions
    from q3vl.runtime.options import RuntimeOptions

    shared = {flag_of(f): f.name for c in (RuntimeOptions, MediaOptions) for f in option_fields(c)}
    for name, parser in command_parsers().items():
        generated = {f.name for d, only in getattr(parser, "q3vl_options", []) for f in option_fields(type(d))
                     if only is None or f.name in only}
        for action in parser._actions:
            for flag in action.option_strings:
                if flag in shared and action.dest not in ENGINE_LIMITS:
                    assert action.dest in generated, f"{name} {flag} is written by hand"


def test_adding_an_option_is_one_field():
    from q3vl.options import check_fields, of
    from q3vl.runtime.options import RuntimeOptions

    @dataclasses.dataclass(frozen=True)
    class More(RuntimeOptions):  # one more field than the runtime's: the whole cost of a new option
        knob: int = opt(3, "a new knob", low=1, numbers=True)

        def __post_init__(self) -> None:
            check_fields(self)

    p = argparse.ArgumentParser()
    add_flags(p, More())
    got = from_args(p.parse_args(["--knob", "5", "--max-pixels", "65536"]), More())
    assert got.knob == 5 and got.max_pixels == 65536 and "--knob" in p.format_help()
    assert numbers(got, changed_only=True) == {"max_pixels": 65536, "knob": 5}  # a resume would compare it
    assert of(More, {"knob": 7}, "More").knob == 7  # the keyword argument exists
    with pytest.raises(ConfigError, match=r"knob=0 \(--knob\) must be greater than 0, not 0"):
        from_args(p.parse_args(["--knob", "0"]), More())


@pytest.mark.parametrize("bad, message", [
    ({"batch_size": True}, "batch_size=True (--batch-size) must be an integer, not bool"),
    ({"max_pixels": 2.5}, "must be an integer, not float"),
    ({"fps": float("nan")}, "fps=nan (--fps) must be a finite number"),
    ({"fps": 0}, "must be greater than 0"),
    ({"max_frames": 1}, "must be at least 2, not 1"),
    ({"truncation": "left"}, "truncation must be one of ['text', 'reference']"),
    ({"min_pixels": 9000, "max_pixels": 8000}, "need min_pixels <= max_pixels"),
    ({"prefetch": 1}, "must be True or False"),
    ({"media_policy": {"allow_local": False}}, "must be a MediaPolicy"),
])
def test_numbers_are_strictly_typed(bad, message):
    from q3vl.runtime.options import RuntimeOptions

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        RuntimeOptions(**bad)


def test_model_keywords_map_onto_the_options_and_unknown_ones_raise(tiny_embedding_bundle):
    from q3vl.runtime import Embedder
    from q3vl.runtime.options import RuntimeOptions

    o = RuntimeOptions.of((8192, 4096, 65536), {"batch_size": 4}, None, "Embedder")  # the wrapper's order
    assert (o.max_length, o.min_pixels, o.max_pixels, o.batch_size) == (8192, 4096, 65536, 4)
    assert RuntimeOptions.of((), {"fps": 2.0}, RuntimeOptions(batch_size=3)).batch_size == 3  # on top of options
    with pytest.raises(UnknownOptionError, match=r"Embedder got unexpected keyword arguments \['max_pixel'\]; "
                                                 r"allowed: \[.*'max_pixels'"):
        Embedder(tiny_embedding_bundle, max_pixel=65536)
    with pytest.raises(ConfigError, match="batch_size=True"):
        Embedder(tiny_embedding_bundle, batch_size=True)
    with pytest.raises(TypeError, match="both positionally and as keywords"):
        RuntimeOptions.of((8192,), {"max_length": 4}, None, "Embedder")
    with Embedder(tiny_embedding_bundle, 4096, max_pixels=65536, batch_size=2) as e:
        assert e.options == RuntimeOptions(max_length=4096, max_pixels=65536, batch_size=2)
        assert e.encoder.config.max_length == 4096 and e.encoder.config.max_pixels == 65536 and e.batch_size == 2


def test_serve_config_is_one_declaration():
    """The old 14-line renaming map is gone: every serve flag's dest is a ServeConfig field, and the
    queue's limits default to the same declarations."""
    from q3vl.serve.config import ServeConfig
    from q3vl.serve.queue import Limits

    parser = command_parsers()["serve"]
    dests = {a.dest for a in parser._actions if a.option_strings} - {"help", "verbose"}
    assert dests == {f.name for f in option_fields(ServeConfig)}
    lim = Limits(8, 1024)
    assert (lim.max_wait, lim.max_batch_requests, lim.max_items) == (
        default_of(ServeConfig, "max_wait_ms") / 1000, default_of(ServeConfig, "max_batch_requests"),
        default_of(ServeConfig, "max_queue_items"))
    c = ServeConfig(embedding="x", max_media_bytes=1000, allowed_hosts=("example.com",))
    assert c.runtime().media_policy.max_item_bytes == 1000 and not c.runtime().media_policy.allow_local
    assert c.runtime().batch_size == 32 and c.runtime().prefetch is False


def test_item_keys_are_declared_once_for_every_front_end():
    """items.KEYS is the only list: the HTTP options, the dataset column map and the adapter's kinds
    are made from it (a key added there reaches all of them)."""
    from q3vl.preprocess.adapter import KINDS
    from q3vl.preprocess.items import CONTENT_KEYS, EMBED_KEYS, KEYS, OPTION_KEYS, embed_item
    from q3vl.ray.rows import HASHED_ALWAYS, ColumnMap
    from q3vl.serve.schemas import ItemOptions

    assert [k.name for k in KEYS] == [*CONTENT_KEYS, *OPTION_KEYS] == list(EMBED_KEYS)
    assert list(ItemOptions.model_fields) == list(OPTION_KEYS)
    assert [k for k, _ in ColumnMap().options] == list(OPTION_KEYS)
    assert set(ColumnMap().as_dict()) == {*HASHED_ALWAYS, "json"} and ColumnMap(**ColumnMap().as_dict()) == ColumnMap()
    assert ColumnMap(max_pixels="mp").as_dict()["max_pixels"] == "mp"
    assert KINDS["embed"] == EMBED_KEYS and KINDS["document"] == CONTENT_KEYS
    good = {"text": "t", "instruction": "i", "fps": 2.0, "max_frames": 4, "min_pixels": 10, "max_pixels": 20,
            "total_pixels": 30, "video_budget": "fit"}
    assert set(good) - {"text"} == set(OPTION_KEYS)
    embed_item(good)
