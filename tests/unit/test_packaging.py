"""The container image's install, reproduced from exactly the files its Containerfile copies.

The wheel is built from a tree holding only what the ``COPY`` lines name, installed into an
empty directory, and run with the interpreter's site directories off (``-S``: no editable
install of this checkout, no working directory on the path), so nothing outside the wheel
can stand in for a file the image lacks.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path, PurePosixPath

import pytest

from gateway.config import parse_config
from gateway.notary import prepare_notary_files
from gateway.store import open_store
from tests.unit.app.conftest import free_port_url

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "Containerfile"

#: Options for each built-in policy, so that the check below loads every one of them. A new
#: built-in policy needs an entry here.
BUILTIN_OPTIONS: dict[str, str] = {
    "server_rules": 'options = { deny_origins = ["*.spam.example"], deny_ip_literals = true }',
    "min_room_version": 'options = { minimum = "10" }',
    "rate_limit": "options = { invites_per_origin = { capacity = 20, per_second = 0.2 } }",
    "policy_lists": 'options = { files = ["banlist.json"], invite_action = "drop" }',
}


def instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Containerfile, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in CONTAINERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def copy_build_context(destination: Path) -> None:
    """Copies what the ``COPY`` lines before the install step copy, as they would, into
    ``destination`` (standing for the WORKDIR they copy into)."""
    workdir = PurePosixPath("/")
    build_dir: PurePosixPath | None = None
    for word, rest in instructions():
        if word == "WORKDIR":
            workdir = workdir / rest
        elif word == "COPY":
            args = shlex.split(rest)
            assert not any(a.startswith("--") for a in args), f"unhandled COPY flags: {rest}"
            *sources, target = args
            build_dir = build_dir or workdir
            assert workdir == build_dir, "every COPY is expected to copy into one directory"
            for source in sources:
                where = destination / target
                if target.endswith("/") or len(sources) > 1:
                    where = where / Path(source).name
                copy = shutil.copytree if (ROOT / source).is_dir() else shutil.copy2
                where.parent.mkdir(parents=True, exist_ok=True)
                copy(ROOT / source, where)
        elif word == "RUN" and build_dir is not None:
            assert rest.startswith("pip install . "), f"the install step changed: {rest}"
            break
    assert build_dir is not None, "no COPY line found"


def builtin_policies() -> list[str]:
    return sorted(p.stem for p in (ROOT / "policies").glob("*.py") if not p.name.startswith("_"))


@pytest.fixture(scope="module")
def image_install(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the wheel, the directory it is installed in)."""
    tmp = tmp_path_factory.mktemp("image")
    context = tmp / "src"
    copy_build_context(context)
    run = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*run, "wheel", "--no-deps", "-w", str(tmp / "dist"), str(context)],
        check=True,
        timeout=300,
    )
    [wheel] = (tmp / "dist").glob("*.whl")
    target = tmp / "installed"
    subprocess.run(
        [*run, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        check=True,
        timeout=120,
    )
    return wheel, target


def run_installed(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # The installed tree first, then this environment's site-packages for the dependencies.
    path = os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "-S", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_wheel_holds_gateway_and_policies_and_no_tests(
    image_install: tuple[Path, Path],
) -> None:
    wheel, _ = image_install
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"gateway", "policies"}
    for module in builtin_policies():
        assert f"policies/{module}.py" in names
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "gateway").rglob("*.py")}
    assert sources <= set(names), sorted(sources - set(names))
    [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "gateway = gateway.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_installed_image_imports_and_checks_every_builtin_policy(
    image_install: tuple[Path, Path], tmp_path: Path
) -> None:
    _, target = image_install
    modules = builtin_policies()
    assert set(modules) == set(BUILTIN_OPTIONS), "give every built-in policy options above"
    where = run_installed(
        target,
        tmp_path,
        "-c",
        "import json, gateway, "
        + ", ".join(f"policies.{m}" for m in modules)
        + "; print(json.dumps([gateway.__file__, policies.__file__]))",
    )
    assert where.returncode == 0, where.stderr
    for file in json.loads(where.stdout):
        assert Path(file).is_relative_to(target), file

    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    shutil.copy2(ROOT / "policies" / "fixtures" / "banlist.json", config_dir / "banlist.json")
    entries = "".join(
        f'\n[[policies]]\nmodule = "policies.{m}"\n{BUILTIN_OPTIONS[m]}\n' for m in modules
    )
    config = config_dir / "gateway.toml"
    config.write_text(
        f"""
[server]
server_name = "hs.test"
[homeserver]
url = "{free_port_url()}"
connect_timeout = 1.0
{entries}"""
    )
    check = run_installed(target, tmp_path, "-m", "gateway", "check", "--config", str(config))
    assert f"configuration {config}: ok" in check.stdout, check.stderr
    # Valid, and then the homeserver does not answer: 2 (1 would be an invalid configuration).
    assert check.returncode == 2, check.stderr


def image_links() -> dict[PurePosixPath, PurePosixPath]:
    """link -> target for the ``ln -s`` commands in the Containerfile's RUN lines."""
    links = {}
    for word, rest in instructions():
        if word != "RUN":
            continue
        for command in rest.split("&&"):
            args = shlex.split(command)
            if args[:2] == ["ln", "-s"]:
                links[PurePosixPath(args[3])] = PurePosixPath(args[2])
    return links


def image_paths() -> tuple[PurePosixPath, PurePosixPath]:
    """(the configuration file CMD runs with, the data volume)."""
    parsed = {word: rest for word, rest in instructions()}
    cmd = json.loads(parsed["CMD"])
    config = PurePosixPath(cmd[cmd.index("--config") + 1])
    [volume] = json.loads(parsed["VOLUME"])
    return config, PurePosixPath(volume)


async def test_the_images_defaults_write_into_the_data_volume(tmp_path: Path) -> None:
    """With the default store.sqlite_path and notary.state_dir, what the gateway writes lands
    in the data volume, not in the (read-only) configuration directory."""
    config_file, volume = image_paths()
    links = image_links()

    def here(path: PurePosixPath) -> Path:
        return tmp_path / path.relative_to("/")

    for link, target in links.items():
        here(link).parent.mkdir(parents=True, exist_ok=True)
        here(volume).mkdir(parents=True, exist_ok=True)  # a fresh, empty volume
        assert PurePosixPath(target).is_relative_to(volume), (link, target)
        here(link).symlink_to(here(target))
    config = parse_config({"server": {"server_name": "hs.test"}}, base_dir=here(config_file.parent))
    for written in (config.store.sqlite_path, config.notary.state_dir):
        assert PurePosixPath("/", written.relative_to(tmp_path)) in links, written

    files = prepare_notary_files(config.notary.state_dir)
    store = await open_store("sqlite", sqlite_path=str(config.store.sqlite_path))
    await store.aclose()
    for made in (
        files.key_path,
        files.secret_path,
        files.certificate_path,
        config.store.sqlite_path,
    ):
        assert made.resolve().is_relative_to(here(volume)), made
    real = [p for p in here(config_file.parent).iterdir() if not p.is_symlink()]
    assert real == [], real
