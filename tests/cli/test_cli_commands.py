"""The command line's layout: one module per command, found by the parser (a new command is one
file), and the sampling options every editing command shares with ``generate``."""
import ast
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

import mage_fast.cli
from mage_fast.cli import DEFAULT_CKPT, build_parser, command_modules, main

CLI_DIR = os.path.dirname(os.path.abspath(mage_fast.cli.__file__))
ORDER = ["generate", "inpaint", "edit", "outpaint", "eval", "fid", "info"]


def _declared_commands() -> dict:
    """Command name -> module file, read from the source of mage_fast/cli (not by the discovery
    under test): every public module that assigns ``NAME`` at its top level."""
    out = {}
    for f in sorted(os.listdir(CLI_DIR)):
        if not f.endswith(".py") or f.startswith("_"):
            continue
        with open(os.path.join(CLI_DIR, f)) as fh:
            tree = ast.parse(fh.read())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NAME" for t in node.targets):
                out[ast.literal_eval(node.value)] = f
    return out


def _commands_in_help(parser) -> list:
    sub = next(a for a in parser._actions if a.dest == "cmd")
    return list(sub.choices)


def test_every_command_module_is_in_the_help_in_a_stable_order():
    declared = _declared_commands()
    assert set(declared) == set(ORDER), declared
    parser = build_parser()
    assert _commands_in_help(parser) == ORDER
    text = parser.format_help()
    for name in declared:
        assert f"\n    {name}" in text, name
    assert [m.NAME for m in command_modules()] == ORDER


HELLO = '''"""``hello``: a toy command, one file."""
from .common import CLIError, add_device_arg

NAME = "hello"
ORDER = 65
HELP = "say hello to someone"


def add_arguments(p):
    p.add_argument("--to", default="world", help="whom to greet")
    add_device_arg(p)


def run(args):
    if not args.to:
        raise CLIError("--to must name someone")
    print(f"hello, {args.to}")
    return 0
'''


def test_a_new_command_is_one_file(tmp_path, monkeypatch, capsys):
    """A module dropped into the package (here through a second folder on the package's path, so
    the source tree is left alone) is in --help at its ORDER, runs through main, and keeps the
    error contract, with nothing else changed."""
    (tmp_path / "hello.py").write_text(HELLO)
    with monkeypatch.context() as m:
        m.setattr(mage_fast.cli, "__path__", [*mage_fast.cli.__path__, str(tmp_path)])
        m.setattr(mage_fast.cli, "hello", None, raising=False)  # the import sets it; removed after
        try:
            parser = build_parser()
            assert _commands_in_help(parser) == ORDER[:-1] + ["hello", "info"]
            assert "say hello to someone" in parser.format_help()
            assert main(["hello", "--to", "you"]) == 0
            assert capsys.readouterr().out == "hello, you\n"
            assert main(["hello", "--to", ""]) == 2
            assert capsys.readouterr().err.splitlines() == ["error: --to must name someone"]
        finally:
            sys.modules.pop("mage_fast.cli.hello", None)
    assert _commands_in_help(build_parser()) == ORDER  # the file gone, the command is gone


@pytest.fixture
def toy_package(tmp_path, monkeypatch):
    """A package ``toy_commands`` in a temporary folder, removed from sys.modules afterwards."""
    pkg = tmp_path / "toy_commands"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield pkg
    for name in [m for m in sys.modules if m == "toy_commands" or m.startswith("toy_commands.")]:
        del sys.modules[name]


def _command(name, order=None):
    text = f'NAME = "{name}"\nHELP = "the {name} command"\n'
    if order is not None:
        text += f"ORDER = {order}\n"
    return text + "def add_arguments(p):\n    pass\n\ndef run(args):\n    return 0\n"


def test_discovery_takes_modules_with_a_command_and_skips_the_rest(toy_package):
    (toy_package / "zeta.py").write_text(_command("zeta", order=1))
    (toy_package / "alpha.py").write_text(_command("alpha"))  # no ORDER: after the numbered ones
    (toy_package / "beta.py").write_text(_command("beta"))
    (toy_package / "_private.py").write_text(_command("private"))  # shared code, never a command
    (toy_package / "helpers.py").write_text("NAME = 'helpers'\n")  # not a whole command
    (toy_package / "sub").mkdir()
    (toy_package / "sub" / "__init__.py").write_text(_command("sub"))  # a sub-package is not a command
    assert [m.NAME for m in command_modules("toy_commands")] == ["zeta", "alpha", "beta"]
    assert _commands_in_help(build_parser("toy_commands")) == ["zeta", "alpha", "beta"]


def test_two_modules_with_one_command_name_are_refused(toy_package):
    (toy_package / "one.py").write_text(_command("same"))
    (toy_package / "two.py").write_text(_command("same"))
    with pytest.raises(RuntimeError, match="toy_commands.one and toy_commands.two"):
        command_modules("toy_commands")


# --------------------------------------------------------------- sampling options of the editing commands
needs_model = pytest.mark.skipif(not os.path.isfile(DEFAULT_CKPT), reason="the shipped model is not present")
REGION = {"inpaint": ["--box", "0,0,16,16"], "edit": ["--box", "0,0,16,16", "--class-id", "bag"],
          "outpaint": ["--keep-box", "8,8,24,24"]}
SHARED = ["--mode", "--order", "--rng", "--schedule", "--temperature-annealing", "--guidance-schedule",
          "--num-iter", "--temperature", "--seed", "--class-id", "--guidance"]


def _options(parser, command) -> set:
    sub = next(a for a in parser._actions if a.dest == "cmd").choices[command]
    return {s for a in sub._actions for s in a.option_strings}


def test_editing_commands_take_the_sampling_options_of_generate():
    parser = build_parser()
    for command in ("generate", "inpaint", "edit", "outpaint"):
        assert set(SHARED) <= _options(parser, command), command


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture
def sampler_calls(monkeypatch):
    """The SamplingConfig each editing run hands to the sampler."""
    import mage_fast.editing
    seen = []
    real = mage_fast.editing.generate

    def spy(*args, **kwargs):
        seen.append(kwargs["config"])
        return real(*args, **kwargs)
    monkeypatch.setattr(mage_fast.editing, "generate", spy)
    return seen


@needs_model
@pytest.mark.parametrize("command", ["inpaint", "edit", "outpaint"])
def test_editing_sampling_options_reach_the_sampler(command, image, tmp_path, sampler_calls, one_thread):
    out = tmp_path / "run"
    argv = [command, "--image", image, *REGION[command], "--num-samples", "1", "--num-iter", "3",
            "--mode", "cached", "--order", "halton", "--rng", "torch", "--schedule", "linear",
            "--temperature-annealing", "cosine", "--guidance-schedule", "linear", "--out", str(out)]
    assert main(argv) == 0
    (cfg,) = sampler_calls
    assert (cfg.mode, cfg.order, cfg.sampler, cfg.schedule) == ("cached", "halton", "torch", "linear")
    assert (cfg.temperature_annealing, cfg.guidance_schedule, cfg.num_iter) == ("cosine", "linear", 3)
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert {k: settings[k] for k in ("mode", "order", "rng", "temperature_annealing", "guidance_schedule")} == \
        {"mode": "cached", "order": "halton", "rng": "torch", "temperature_annealing": "cosine",
         "guidance_schedule": "linear"}


@needs_model
def test_editing_order_and_mode_change_the_result(image, tmp_path, one_thread):
    """--order halton fixes other tokens than the confidence order, so the same seed gives another
    image; --mode auto is named once and recorded as the preset it chose."""
    common = ["inpaint", "--image", image, "--box", "0,0,32,16", "--num-samples", "1", "--num-iter", "4"]
    for name, extra in (("confidence", []), ("halton", ["--order", "halton"]), ("auto", ["--mode", "auto"])):
        assert main(common + extra + ["--out", str(tmp_path / name)]) == 0
    a, b = (np.asarray(Image.open(tmp_path / n / "00000.png")) for n in ("confidence", "halton"))
    assert not np.array_equal(a, b)
    from mage_fast.decoding import auto_mode
    assert json.loads((tmp_path / "auto" / "run.json").read_text())["settings"]["mode"] == auto_mode("cpu")


BAD = [  # (id, extra flags, words of the one error line) for a value refused by mage_fast's checks
    ("mode-unknown", ["--mode", "fastest"], ["mode", "fastest"]),
    ("mode-bad-spec", ["--mode", "refresh=4,focus=2,focus_by=bogus"], ["focus_by must be one of"]),
    ("rng-official", ["--rng", "official"], ["--rng official", "--rng torch"]),
]
CHOICES = [("order", ["--order", "random"]), ("rng", ["--rng", "numpy"]),
           ("temperature-annealing", ["--temperature-annealing", "fast"]),
           ("guidance-schedule", ["--guidance-schedule", "cubic"])]


@needs_model
@pytest.mark.parametrize("command", ["inpaint", "edit", "outpaint"])
@pytest.mark.parametrize("cid, extra, words", BAD, ids=[b[0] for b in BAD])
def test_editing_refuses_a_bad_sampling_option_with_one_line(command, cid, extra, words, image, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([command, "--image", image, *REGION[command], *extra, "--out", str(out)]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not out.exists()


@pytest.mark.parametrize("command", ["inpaint", "edit", "outpaint"])
@pytest.mark.parametrize("flag, extra", CHOICES, ids=[c[0] for c in CHOICES])
def test_editing_refuses_a_value_outside_the_choices(command, flag, extra, tmp_path, capsys):
    """Values outside a flag's choices are argparse's usage errors: status 2, one ``error:`` line
    naming the flag (after the usage), nothing written."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main([command, "--image", "in.png", *REGION[command], *extra, "--out", str(out)])
    assert e.value.code == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(errors) == 1 and f"argument --{flag}: invalid choice" in errors[0], errors
    assert not out.exists()


@needs_model
def test_editing_says_once_when_a_mode_is_slower_than_fp32_here(image, tmp_path, capsys, monkeypatch, one_thread):
    """As generate: one note, and no SlowModeWarning from the sampler on top of it."""
    import warnings

    from mage_fast.decoding import SlowModeWarning, quant
    monkeypatch.setattr(quant, "bf16_native", lambda dev: False)  # a CPU without AMX or AVX512-BF16
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["inpaint", "--image", image, "--box", "0,0,16,16", "--num-samples", "1", "--num-iter", "2",
                     "--mode", "cached_bf16", "--out", str(tmp_path / "run")]) == 0
    notes = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("note: --mode cached_bf16: bf16 runs")]
    assert len(notes) == 1, notes
    assert not [w for w in caught if issubclass(w.category, SlowModeWarning)]
