"""The recovery app on a real (localhost) fleet: a flower-superlink and two flower-supernode
processes on free ports, `flwr run` of the shipped app folder, one round on a tiny model.

Two fleets, marked integration (40-95 s each on a busy 2-core machine): insecure, and TLS (a CA
and a server certificate for localhost/127.0.0.1 made here with openssl) with SuperNode
authentication (EC key pairs made with ssh-keygen, registered with `flwr supernode register`).
The commands are the ones docs/fleet.md gives. Every process this test starts (and the
SuperExec/ServerApp/ClientApp processes they start) is stopped at the end, also on failure, and
the processes' logs are printed when the test fails. The default run keeps the fast checks:
`flwr build` of the app, the port-in-use error, the app's run-config defaults."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import tomllib

import llmprune
from llmprune.fedrecover import RecoverConfig, RunSettings, parse_run_config
from llmprune.fedrecover.deploy import (
    app_dir,
    node_config,
    run_config_defaults,
    run_config_overrides,
    superlink_connection_toml,
)
from llmprune.fedrecover.server_app import SERVER_ROOT_ENV
from llmprune.testing import TINY_TEXT, tiny_checkpoint

BIN = Path(sys.executable).parent
needs_flower = pytest.mark.skipif(not (BIN / "flower-superlink").exists() or not (BIN / "flwr").exists(),
                                  reason="flower-superlink / flwr not installed beside this Python")
CONNECTION = "llmprune-test"


def free_ports(count: int) -> list[int]:
    """Distinct ports nothing listens on (all held open while choosing, so none repeats)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


class Fleet:
    """The processes of one localhost fleet, their logs, and their cleanup."""

    def __init__(self, root: Path):
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.may_exit: set[str] = set()   # processes expected to stop by themselves
        self.t0 = time.monotonic()
        self.env = {**os.environ, "FLWR_HOME": str(root / "flwr-home"),
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1",
                    # the operator's rule: a run's server-side paths must lie inside this folder
                    SERVER_ROOT_ENV: str(root)}

    def mark(self, event: str) -> None:
        with open(self.logs / "timeline.log", "a") as f:
            f.write(f"{time.monotonic() - self.t0:7.2f} s  {event}\n")

    def start(self, name: str, args: list[str], may_exit: bool = False) -> subprocess.Popen:
        self.mark(f"start {name}")
        if may_exit:
            self.may_exit.add(name)
        with open(self.logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, cwd=self.root)
        self.procs[name] = proc
        return proc

    def cli(self, name: str, args: list[str], timeout: float = 120) -> str:
        """Run a short command (flwr, openssl, ssh-keygen); its output goes to the logs too."""
        self.mark(f"run {name}")
        done = subprocess.run(args, capture_output=True, text=True, env=self.env, cwd=self.root, timeout=timeout)
        self.mark(f"{name} done")
        (self.logs / f"{name}.log").write_text(f"$ {' '.join(args)}\n{done.stdout}\n{done.stderr}")
        assert done.returncode == 0, f"{name} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            assert name in self.may_exit or proc.poll() is None, f"{name} exited with code {proc.returncode}"

    def stop(self) -> None:
        """Terminate every started process and its descendants (SuperExec, ServerApp and
        ClientApp processes run in their own sessions), then kill what is left."""
        family = []
        for proc in self.procs.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                parent = psutil.Process(proc.pid)
                family += parent.children(recursive=True) + [parent]
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(family, timeout=1)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                self.mark(f"kill {p.pid} {p.name()}")
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)

    def dump_logs(self) -> None:
        for path in sorted(self.logs.glob("*.log")):
            print(f"\n===== {path.name} =====\n{path.read_text(errors='replace')[-6000:]}")

    @contextlib.contextmanager
    def logs_on_failure(self):
        try:
            yield
        except BaseException:
            self.dump_logs()
            raise


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        f.stop()


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    """The checkpoint the server recovers (the devices read the same folder here)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("deploy") / "pruned", "llama")


def wait_for_port(fleet: Fleet, port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fleet.check_alive()
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on port {port} after {timeout:.0f} s")


def wait_for_metrics(fleet: Fleet, path: Path, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fleet.check_alive()
        if path.is_file():
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(path.read_text())
        time.sleep(0.5)
    raise AssertionError(f"{path} not written within {timeout:.0f} s")


def _json_out(text: str) -> dict:
    return json.loads(text[text.index("{"):text.rindex("}") + 1])


def make_certificates(fleet: Fleet) -> Path:
    """docs/fleet.md, step 1: a CA and a server certificate for localhost / 127.0.0.1."""
    certs = fleet.root / "certs"
    certs.mkdir()
    (certs / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    fleet.cli("openssl-ca", ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "certs/ca.key",
                             "-out", "certs/ca.crt", "-days", "365", "-subj", "/CN=llmprune-fleet-ca"])
    fleet.cli("openssl-csr", ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "certs/server.key",
                              "-out", "certs/server.csr", "-subj", "/CN=localhost"])
    fleet.cli("openssl-sign", ["openssl", "x509", "-req", "-in", "certs/server.csr", "-CA", "certs/ca.crt",
                               "-CAkey", "certs/ca.key", "-CAcreateserial", "-out", "certs/server.crt",
                               "-days", "365", "-sha256", "-extfile", "certs/server.ext"])
    return certs


def deploy_and_recover(fleet: Fleet, model: Path, secure: bool) -> dict:
    root = fleet.root
    model = Path(shutil.copytree(model, root / "pruned"))   # inside the server root
    for name in ("device0", "device1", "heldout"):
        (root / f"{name}.txt").write_text(TINY_TEXT * 3)
    out = root / "recovered"
    port, *node_ports = free_ports(4)   # SuperLink (Fleet, Control and Runtime API), 3 SuperNodes' runtime APIs

    superlink = ["flower-superlink", "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"]
    supernode_tls = ["--insecure"]
    root_certificates = None
    if secure:
        certs = make_certificates(fleet)
        superlink += ["--ssl-ca-certfile", "certs/ca.crt", "--ssl-certfile", "certs/server.crt",
                      "--ssl-keyfile", "certs/server.key", "--enable-supernode-auth"]
        supernode_tls = ["--root-certificates", "certs/ca.crt"]
        root_certificates = certs / "ca.crt"
    else:
        superlink += ["--insecure"]
    fleet.start("superlink", superlink)
    home = Path(fleet.env["FLWR_HOME"])
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        superlink_connection_toml(CONNECTION, f"127.0.0.1:{port}", root_certificates=root_certificates))
    wait_for_port(fleet, port)
    fleet.mark("superlink listens")

    # The TLS fleet also has a fleet file: each SuperNode names its device, and the devices'
    # LoRA ranks differ (phone-b's rank and depth are fixed in the file), so hetlora aggregates.
    devices = ["phone-b", "phone-a"] if secure else [None, None]
    if secure:
        (root / "fleet.toml").write_text('[[device]]\nname = "phone-a"\nmemory_mb = 2000\n\n'
                                         '[[device]]\nname = "phone-b"\nmemory_mb = 2000\nrank = 2\ndepth = 1\n')
    registered = set()
    for i in range(2):
        node = ["flower-supernode", *supernode_tls, "--superlink", f"127.0.0.1:{port}", "--port", str(node_ports[i]),
                "--node-config", node_config(i, 2, root / f"device{i}.txt", device=devices[i])]
        if secure:
            (root / "keys").mkdir(exist_ok=True)
            fleet.cli(f"ssh-keygen-{i}", ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", f"keys/node{i}"])
            answer = fleet.cli(f"register-{i}", ["flwr", "supernode", "register", f"keys/node{i}.pub", CONNECTION,
                                                 "--format", "json"])
            registered.add(int(_json_out(answer)["node-id"]))
            node += ["--auth-supernode-private-key", f"keys/node{i}"]
        fleet.start(f"supernode{i}", node)
    if secure:  # a device whose key nobody registered is turned away
        fleet.cli("ssh-keygen-rogue", ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", "keys/rogue"])
        rogue = fleet.start("rogue", ["flower-supernode", *supernode_tls, "--superlink", f"127.0.0.1:{port}",
                                      "--port", str(node_ports[2]), "--auth-supernode-private-key", "keys/rogue",
                                      "--node-config", node_config(0, 2, root / "device0.txt")], may_exit=True)

    settings = dict(clients=2, rounds=1, local_steps=2, seq_len=32, batch_size=2, eval_data=str(root / "heldout.txt"),
                    node_timeout=120, round_timeout=180)
    if secure:
        settings.update(fleet=str(root / "fleet.toml"), aggregation="hetlora")
    else:   # the plain fleet runs split training: per-step messages between SuperLink and SuperNodes
        settings.update(policy="split")
    config = RecoverConfig.of(**settings)
    answer = fleet.cli("flwr-run", ["flwr", "run", str(app_dir()), CONNECTION, "--run-config",
                                    run_config_overrides(model, out, config), "--format", "json"])
    run_id = _json_out(answer)["run-id"]
    try:
        metrics = wait_for_metrics(fleet, out / "metrics.json", timeout=300)
    except AssertionError:
        with contextlib.suppress(Exception):
            fleet.cli("flwr-log", ["flwr", "log", str(run_id), CONNECTION, "--show"], timeout=30)
        raise

    fleet.mark(f"metrics.json written (round: {metrics['rounds'][0]['seconds']} s)")
    assert len(metrics["rounds"]) == 1
    row = metrics["rounds"][0]
    assert row["clients_sampled"] == 2 and row["clients_returned"] == 2 and row["applied"]
    assert row["bytes_up"] > 0 and row["eval_perplexity"] is not None
    assert sorted(d["partition-id"] for d in metrics["devices"]) == [0, 1]
    if not secure:  # every device ran both steps on its cut; its LoRA came back with the last message
        assert metrics["policy"] == "split"
        assert all(c["split_steps"] == 2 and c["cut"] == {"front": 2, "back": 4} and c["bytes_up_per_step"] > 0
                   for c in row["clients"]), row["clients"]
    if secure:  # the round ran on the two registered SuperNodes; the unregistered one was refused
        assert {d["node-id"] for d in metrics["devices"]} == registered
        assert rogue.wait(timeout=30) != 0
        assert "Failed to activate SuperNode" in (fleet.logs / "rogue.log").read_text()
        by_pid = sorted(metrics["devices"], key=lambda d: d["partition-id"])
        assert [d["device"] for d in by_pid] == ["phone-b", "phone-a"]   # matched by name, not by order
        assert (by_pid[0]["rank"], by_pid[0]["depth"]) == (2, 1) and by_pid[1]["rank"] == 8 and by_pid[1]["depth"] > 1
        assert metrics["aggregation"] == "hetlora"
    llmprune.load_model(out)
    fleet.mark("merged model loads")
    fleet.cli("flwr-log", ["flwr", "log", str(run_id), CONNECTION, "--show"], timeout=60)
    shown = (fleet.logs / "flwr-log.log").read_text()
    assert "llmprune.fedrecover.strategy: round 1: 2/2 clients" in shown, shown[-3000:]   # the operator's view
    return metrics


@needs_flower
@pytest.mark.integration   # 40-95 s each on the shared 2-core machine (flwr-clientapp starts per message)
@pytest.mark.parametrize("secure", [False, True], ids=["insecure", "tls-node-auth"])
def test_fleet_round_on_localhost(fleet, pruned, secure):
    if secure and not (shutil.which("openssl") and shutil.which("ssh-keygen")):
        pytest.skip("openssl and ssh-keygen make the certificates and node keys")
    with fleet.logs_on_failure():
        deploy_and_recover(fleet, pruned, secure)


@needs_flower
def test_superlink_port_in_use(fleet):
    """Flower's own error when the SuperLink's port is taken: exit code 1 and uvicorn's
    '[Errno 98] ... address already in use' naming the address (docs/fleet.md)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = fleet.start("superlink", ["flower-superlink", "--insecure", "--port", str(port),
                                         "--disable-runtime-dependency-installation"])
        with fleet.logs_on_failure():
            assert proc.wait(timeout=60) != 0
            log = (fleet.logs / "superlink.log").read_text()
            assert "address already in use" in log and str(port) in log


@needs_flower
def test_app_builds_into_a_fab(tmp_path):
    """What `flwr run` does first, in the default test run: validate the app folder (the
    components import) and bundle it."""
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_TELEMETRY_ENABLED": "0"}
    done = subprocess.run([str(BIN / "flwr"), "build", "--app", str(app_dir())], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    fab, = tmp_path.glob("*.fab")
    assert fab.name.startswith(f"llmprune.llmprune-fedrecover.{llmprune.__version__.replace('.', '-')}.")


def test_app_config_matches_recover_config():
    """The shipped app folder declares the components and every run-config key with the
    defaults RecoverConfig has (flwr run rejects override keys the app does not declare)."""
    project = tomllib.loads((app_dir() / "pyproject.toml").read_text())
    app = project["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "llmprune.fedrecover.server_app:app",
                                 "clientapp": "llmprune.fedrecover.client_app:app"}
    from flwr.common.config import flatten_dict

    assert flatten_dict(app["config"]) == run_config_defaults()
    assert project["project"]["version"] == llmprune.__version__
    cfg, settings = parse_run_config(flatten_dict(app["config"]))
    assert cfg == RecoverConfig() and settings == RunSettings()


def test_override_strings():
    cfg = RecoverConfig.of(clients=2, rounds=1, seq_len=32, policy="bandit", fleet="f.toml", aggregation="hetlora",
                           arm_sizes="0.5,1")
    assert run_config_overrides("/m", "/o", cfg) == ("model='/m' out='/o' policy.name='bandit' data.seq-len=32 "
                                                     "training.rounds=1 training.aggregation='hetlora' "
                                                     "fleet.clients=2 fleet.file='f.toml' fleet.client-dtype='bfloat16' "
                                                     "fleet.client-embedding='int8' policy.bandit.arm-sizes='0.5,1'")
    # (the bandit's defaults, lean devices, travel in the overrides: the app's pyproject says float32)
    assert run_config_overrides("/m", "/o", resume=True) == "model='/m' out='/o' resume=true"
    with pytest.raises(ValueError, match="not run-config keys"):
        run_config_overrides("/m", "/o", learning_rate=1)
    assert node_config(1, 2, "/d/own.txt", device="pixel") == \
        "partition-id=1 num-partitions=2 data-path='/d/own.txt' device='pixel'"
