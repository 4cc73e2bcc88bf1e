"""Every command the README and the docs show (the bundles' model cards, docs/) is checked against what it names:
bundle configs and their keys, medfm commands and their options, MONAI bundle commands, make targets; the README's
Python example runs."""

import inspect
import re
import runpy
import shlex
from pathlib import Path

import numpy as np
import pytest

import medfm
from medfm.cli import commands
from medfm.inference import check_overrides
from tests.conftest import BUNDLES, REPO

README = REPO / "README.md"
#: Each document with the folder its commands start in: a model card's commands run in its bundle.
DOCUMENTS = {README: REPO, REPO / "docs" / "monailabel.md": REPO,
             **{card: card.parents[1] for card in sorted(BUNDLES.glob("*/docs/README.md"))}}


def _code_blocks(document: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", document.read_text(encoding="utf-8"), flags=re.S | re.M)


def _shell_commands() -> list[tuple[Path, Path, list[str]]]:
    """``(document, folder the command runs in, argv)`` for every command of the bash blocks, following ``cd``
    (``cd bundles/...`` is from the repository's root, as the documents say)."""
    found = []
    for document, start in DOCUMENTS.items():
        for block in _code_blocks(document, "bash"):
            folder = start
            for line in block.replace("\\\n", " ").splitlines():
                argv = shlex.split(line, comments=True)
                if argv[:1] == ["cd"]:
                    folder = ((REPO if argv[1].startswith("bundles/") else folder) / argv[1]).resolve()
                elif argv:
                    found.append((document, folder, argv))
    return found


SHELL_COMMANDS = _shell_commands()


def _options(argv: list[str]) -> dict[str, str]:
    """``--key value`` pairs (a flag without a value maps to ``""``)."""
    options = {}
    for position, token in enumerate(argv):
        if token.startswith("--") and "=" in token:
            key, _, options[key] = token[2:].partition("=")
        elif token.startswith("--"):
            following = argv[position + 1] if position + 1 < len(argv) else ""
            options[token[2:]] = "" if following.startswith("--") else following
    return options


#: ``monai.bundle run``'s own arguments; every other option overrides a config key.
RUN_ARGUMENTS = {"config_file", "meta_file", "logging_file", "init_id", "run_id", "final_id", "tracking", "args_file"}


def _check_bundle_run(folder: Path, argv: list[str]) -> None:
    assert (folder / "configs" / "metadata.json").is_file(), f"{folder} is not a bundle"
    options = {key: value for key, value in _options(argv).items() if key not in RUN_ARGUMENTS - {"config_file"}}
    config_file = options.pop("config_file")
    configs = eval(config_file) if config_file.startswith("[") else [config_file]  # the README's own literal
    names = [Path(config).name for config in configs]
    for config in configs:
        assert (folder / config).is_file(), f"{folder.name}: no {config}"
    check_overrides(folder, names, options)


def _check_monai_command(folder: Path, argv: list[str]) -> None:
    import monai.bundle

    command, options = argv[0], _options(argv)
    if command == "run":
        return _check_bundle_run(folder, argv)
    parameters = inspect.signature(getattr(monai.bundle, command)).parameters
    assert set(options) <= set(parameters), f"monai.bundle {command} has no {set(options) - set(parameters)}"
    for option in ("meta_file", "config_file"):
        if option in options:
            assert (folder / options[option]).is_file(), f"{folder.name}: no {options[option]}"


def _positionals(argv: list[str]) -> list[str]:
    values = set()
    for position, token in enumerate(argv):
        if token.startswith("--") and position + 1 < len(argv) and not argv[position + 1].startswith("--"):
            values.add(position + 1)
    return [token for position, token in enumerate(argv) if not token.startswith("--") and position not in values]


def _check_medfm_command(argv: list[str], made: dict | None = None) -> None:
    """``made``: bundles the documents make first (label bundles), by the path the documents give them."""
    command, arguments = commands()[argv[0]], argv[1:]
    if isinstance(command, dict):  # medfm weights fetch ...
        command, arguments = command[arguments[0]], arguments[1:]
    parameters = inspect.signature(command).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unknown = set(_options(arguments)) - set(parameters)
    assert takes_any or not unknown, f"medfm {argv[0]} has no option {sorted(unknown)}"
    if next(iter(parameters), None) in ("bundle", "bundles"):  # the first argument names bundles of this repository
        named = _positionals(arguments)[:1]  # none for ``medfm release``: every bundle
        known = {p.name for p in BUNDLES.iterdir()} | {str(path.relative_to(REPO)) for path in (made or {})} | MADE_BY_FINETUNE
        assert {name.rstrip("/") for names in named for name in names.split(",")} <= known, named


#: Task bundles the documents make with ``medfm finetune ... --out NAME`` and then run by that name.
MADE_BY_FINETUNE = {_options(argv)["out"] for _, _, argv in SHELL_COMMANDS if argv[:2] == ["medfm", "finetune"]}


def _strip_launcher(argv: list[str]) -> list[str]:
    """The command a ``torchrun ... -m MODULE`` or ``python -m MODULE`` line runs, as ``[MODULE, args...]``."""
    start = argv.index("-m")
    return argv[start + 1:]


@pytest.fixture(scope="module")
def label_bundles(tmp_path_factory):
    """The label bundle docs/monailabel.md makes (``medfm label-bundle ... --out apps/monaibundle/model/genesis_seg``)."""
    from medfm.task_bundle import make_label_bundle

    made = make_label_bundle("models_genesis_chest_ct", "liver,spleen", tmp_path_factory.mktemp("apps") / "genesis_seg")
    return {REPO / "apps" / "monaibundle" / "model" / "genesis_seg": made}


def _check_setup_command(argv: list[str]) -> None:
    """Environment setup (docs/monailabel.md): the MONAI Label version it installs is the one the tests run."""
    pinned = re.search(r"monailabel==([\d.]+)", (REPO / "Makefile").read_text())[1]
    for token in argv:
        if token.startswith("monailabel=="):
            assert token == f"monailabel=={pinned}"


@pytest.mark.parametrize("document, folder, argv", SHELL_COMMANDS,
                         ids=[f"{d.relative_to(REPO)}: {' '.join(argv)[:70]}" for d, _, argv in SHELL_COMMANDS])
def test_documented_command_names_what_exists(document, folder, argv, label_bundles):
    program, folder = argv[0], label_bundles.get(folder, folder)
    if program == "pip" or argv[:3] == ["python", "-m", "venv"] or argv[:2] == ["monailabel", "apps"]:
        return _check_setup_command(argv)
    if program.endswith("python") and argv[1].startswith("benchmarks/"):  # a benchmark script and its options
        source = (REPO / argv[1]).read_text()
        assert all(f'"--{option}"' in source for option in _options(argv)), argv
        return
    if program in ("python", "torchrun") and "-c" not in argv:
        module, *rest = _strip_launcher(argv)
        if module == "monai.bundle":
            _check_monai_command(folder, rest)
        elif module == "medfm":
            _check_medfm_command(rest, label_bundles)
        else:
            pytest.fail(f"README runs an unchecked module: {module}")
    elif program == "python":  # python -c: the API it calls exists
        import medfm

        for name in re.findall(r"medfm\.(\w+)\(", argv[argv.index("-c") + 1]):
            assert callable(getattr(medfm, name, None)), f"medfm.{name}"
    elif program == "medfm":
        _check_medfm_command(argv[1:], label_bundles)
    elif program == "make":
        targets = set(re.findall(r"^([a-z-]+):", (REPO / "Makefile").read_text(), flags=re.M))
        assert set(argv[1:]) <= targets
    elif program == "monailabel":
        assert argv[1] == "start_server" and argv[argv.index("--conf") + 1] == "models"
    elif program == "export":  # the variables medfm reads (credentials for DICOMweb)
        from medfm.io import dicomweb

        known = {dicomweb.DICOMWEB_TOKEN_ENV, dicomweb.DICOMWEB_USER_ENV, dicomweb.DICOMWEB_PASSWORD_ENV}
        assert {assignment.split("=")[0] for assignment in argv[1:] if "=" in assignment} <= known, argv
    else:
        pytest.fail(f"{document.name} shows a command this test does not check: {' '.join(argv)}")


def test_every_document_shows_commands_this_test_checks():
    assert {document for document, _, _ in SHELL_COMMANDS} == set(DOCUMENTS)
    assert len(SHELL_COMMANDS) > 80


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    (example,) = _code_blocks(README, "python")
    monkeypatch.chdir(REPO)  # it names the bundle's weights by their path in the repository
    script = tmp_path / "example.py"
    script.write_text(example + "\nassert tuple(window.shape) == (1, 512)\n"
                      "assert pair['image'].shape == pair['label'].shape == (1, 64, 64, 32)\n")
    names = runpy.run_path(str(script))
    # what it computes is what the bundle computes
    summary = medfm.embed("models_genesis_chest_ct", [medfm.samples.path("ct_head")], out=tmp_path / "cli", progress=False)
    np.testing.assert_array_equal(names["vector"], np.load(tmp_path / "cli" / summary.rows[0]["embedding"]))


def test_the_version_statement_is_what_setup_cfg_declares_and_ci_installs():
    """The README's tested versions: the floors are setup.cfg's (which make test-lowest installs), the top is the
    torch the Makefile installs and the MONAI this environment resolved."""
    import monai
    import torch

    from tests.lowest_requirements import lowest_requirements

    statement = " ".join(README.read_text(encoding="utf-8").split("**Versions.**")[1].split("\n\n")[0].split())
    floors = {re.match(r"[\w-]+", requirement).group(0): requirement.split("==")[1] for requirement in lowest_requirements()}
    assert f"torch >= {floors['torch']}" in statement and f"MONAI {floors['monai']} to 1.6.x" in statement
    assert f"torch {floors['torch']} and MONAI {floors['monai']}" in statement
    makefile = (REPO / "Makefile").read_text()
    pinned = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", makefile, flags=re.M).group(1)
    assert f"`make test` with torch {pinned} and the newest MONAI the range admits ({monai.__version__} today)" in statement
    assert torch.__version__.split("+")[0] in (pinned, floors["torch"]), "this suite runs on one of the two tested torches"
    assert "make test-lowest" in (REPO / ".ci" / "run").read_text()
