"""Trials on other machines: the remote config, the worker checks, shared artifacts, and a real 2-worker experiment.

The real experiment starts two SSH servers on this machine, each with its own HOME: one on loopback, one inside a
network namespace the test creates (so that the manager's address really matters). Traffic stays on loopback and
inside that namespace.
"""

import getpass
import json
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from compression.errors import UserError
from compression.experiment import best_trial, trial_output_dir, trials_from_disk
from compression.remote import Host, check_workers, parse_hosts, remote_config, trial_command
from compression.runtime import onnx_session, temp_sibling, write_atomic

ROOT = Path(__file__).resolve().parents[1]
NNICTL = Path(sys.executable).parent / "nnictl"
SSHD = Path("/usr/sbin/sshd")
TINY_BUDGET = ("--set prune_rounds=1 --set round_steps=1 --set kd_steps=2 --set batch=4 --set crop=32 "
               "--set calib_images=8 --set recon_images=4 --set device=cpu")


# ---------------------------------------------------------------------------------------------------------------------
# The config and the shared folder, without SSH


def test_hosts_parse_with_default_user_and_port_and_bad_ones_fail_in_one_line():
    assert parse_hosts("ubuntu@10.0.0.2, ubuntu@h3:2222 [::1]:23") == [
        Host("ubuntu", "10.0.0.2", 22), Host("ubuntu", "h3", 2222), Host(getpass.getuser(), "::1", 23)]
    for bad in ("ubuntu@", "a@b:0", "a@b:99999", "a b@c/d", ""):
        with pytest.raises(UserError):
            parse_hosts(bad)


def test_trial_command_takes_the_environment_else_the_default_and_makes_paths_absolute(tmp_path):
    template = 'python trial.py --weights "${YC_WEIGHTS:-../w/yolov5n.pt}" --imgsz "${YC_IMGSZ:-640}" ' \
               '${YC_BUDGET:---set kd_steps=200}'
    got = trial_command(template, {"YC_IMGSZ": "320"}, code_dir=tmp_path / "repo")
    assert got == f'python trial.py --weights "{tmp_path}/w/yolov5n.pt" --imgsz "320" --set kd_steps=200'
    got = trial_command(template, {"YC_BUDGET": "--set sparsity=0"}, code_dir=tmp_path)
    assert got.endswith('--imgsz "640" --set sparsity=0')
    with pytest.raises(UserError, match="YC_WEIGHTS"):
        trial_command(template, {"YC_WEIGHTS": '/a/"b'}, code_dir=tmp_path)


def test_remote_config_keeps_the_search_and_sets_what_workers_need(tmp_path):
    base = yaml.safe_load((ROOT / "experiment.yml").read_text())
    overlay = yaml.safe_load((ROOT / "experiment.remote.yml").read_text())
    hosts = parse_hosts("u@10.0.0.2 u@10.0.0.3:2222 u@10.0.0.4")
    cfg = remote_config(base, overlay, tmp_path / "shared", "10.0.0.1", hosts, tmp_path / "key", "/opt/venv/bin",
                        env={"YC_IMGSZ": "320"})
    assert cfg["tuner"] == {**base["tuner"], "codeDirectory": str(ROOT)}  # the custom tuner's folder, made absolute
    assert cfg["assessor"] == base["assessor"] and cfg["maxTrialNumber"] == base["maxTrialNumber"]
    assert cfg["nniManagerIp"] == "10.0.0.1" and cfg["trialConcurrency"] == 3
    assert cfg["trainingService"]["platform"] == "remote"
    assert [(m["host"], m["port"], m["pythonPath"]) for m in cfg["trainingService"]["machineList"]] == [
        ("10.0.0.2", 22, "/opt/venv/bin"), ("10.0.0.3", 2222, "/opt/venv/bin"), ("10.0.0.4", 22, "/opt/venv/bin")]
    assert Path(cfg["searchSpaceFile"]).is_absolute() and Path(cfg["trialCodeDirectory"]) == ROOT
    command = cfg["trialCommand"]
    assert command.startswith(f"YC_SHARED={tmp_path / 'shared'} python trial.py --nni")
    assert "${" not in command and '--imgsz "320"' in command  # nothing left for the worker's shell to miss
    assert f'--weights "{(ROOT / "../shared/weights/yolov5n.pt").resolve()}"' in command
    # without hosts, the machineList of experiment.remote.yml is used as written
    cfg = remote_config(base, overlay, tmp_path, "10.0.0.1")
    assert cfg["trainingService"]["machineList"] == overlay["trainingService"]["machineList"]


def test_the_check_refuses_an_address_not_of_this_machine_and_a_missing_key_in_one_line(tmp_path):
    base = yaml.safe_load((ROOT / "experiment.yml").read_text())
    overlay = yaml.safe_load((ROOT / "experiment.remote.yml").read_text())
    hosts = parse_hosts("u@192.0.2.7 u@192.0.2.8")  # TEST-NET-1: never contacted, the key check comes first
    port = 20000 + os.getpid() % 20000
    cfg = remote_config(base, overlay, tmp_path, "192.0.2.1", hosts, tmp_path / "no_key", "/opt/venv/bin")
    with pytest.raises(UserError, match="cannot listen on nniManagerIp 192.0.2.1 .* not an address of this machine"):
        check_workers(cfg, tmp_path, port)
    cfg = remote_config(base, overlay, tmp_path, "127.0.0.1", hosts, tmp_path / "no_key", "/opt/venv/bin")
    with pytest.raises(UserError) as info:
        check_workers(cfg, tmp_path, port)
    assert str(info.value).count("SSH key") == 2 and "\n" not in str(info.value)
    assert not list((tmp_path / ".checks").iterdir())  # the token written for the workers is gone


def test_nniignore_keeps_the_upload_small():
    """NNI refuses a code folder of more than 2,000 files: the virtual environment alone has tens of thousands."""
    patterns = (ROOT / ".nniignore").read_text().split()
    assert {".venv/", "runs/", "*.onnx", "*.pt", ".git/"} <= set(patterns)


def test_a_trial_under_nni_writes_to_the_shared_folder_when_one_is_named(tmp_path, monkeypatch):
    env = {"NNI_EXP_ID": "exp1", "NNI_TRIAL_JOB_ID": "t1", "NNI_OUTPUT_DIR": str(tmp_path / "nni")}
    monkeypatch.delenv("YC_SHARED", raising=False)
    assert trial_output_dir(None, env) == tmp_path / "nni"
    monkeypatch.setenv("YC_SHARED", str(tmp_path / "shared"))
    assert trial_output_dir(None, env) == tmp_path / "shared" / "experiments" / "exp1" / "t1"
    assert trial_output_dir(tmp_path / "mine", env) == tmp_path / "mine"  # --out wins


def test_temporary_names_differ_between_writers_and_keep_the_suffix(tmp_path):
    names = {temp_sibling(tmp_path / "a.onnx") for _ in range(100)}
    assert len(names) == 100 and all(n.suffix == ".onnx" and n.name.startswith(".a.") for n in names)
    assert socket.gethostname() in next(iter(names)).name  # two machines with the same pid cannot collide


def _publish_many(path: str, byte: int) -> None:
    for _ in range(20):
        write_atomic(path, bytes([byte]) * 2_000_000)


def test_concurrent_writers_leave_one_whole_entry(tmp_path):
    """Eight processes publish the same entry, each 2 MB of its own byte: the survivor is one writer's whole file."""
    import multiprocessing

    fork = multiprocessing.get_context("fork")  # this process has torch loaded already: forking is cheap
    procs = [fork.Process(target=_publish_many, args=(str(tmp_path / "entry.bin"), i)) for i in range(8)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0] * 8
    data = (tmp_path / "entry.bin").read_bytes()
    assert len(data) == 2_000_000 and len(set(data)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["entry.bin"]  # no temporary file left behind


def _fake_experiment(root: Path, exp_id: str, trials: dict[str, float]) -> None:
    """An NNI experiment folder as NNI 3.0 writes it, with SUCCEEDED trials and their final metrics."""
    (root / exp_id / "db").mkdir(parents=True)
    con = sqlite3.connect(root / exp_id / "db" / "nni.sqlite")
    con.execute("create table TrialJobEvent (timestamp integer, trialJobId text, event text, data text, "
                "logPath text, sequenceId integer, message text)")
    con.execute("create table MetricData (timestamp integer, trialJobId text, parameterId text, type text, "
                "sequence integer, data text)")
    for i, (trial, value) in enumerate(trials.items()):
        params = json.dumps({"parameter_id": i, "parameters": {"sparsity": 0.0}})
        con.execute("insert into TrialJobEvent values (?, ?, 'WAITING', ?, '', ?, '')", (i, trial, params, i))
        con.execute("insert into TrialJobEvent values (?, ?, 'SUCCEEDED', '', '', ?, '')", (100 + i, trial, i))
        con.execute("insert into MetricData values (?, ?, ?, 'FINAL', 0, ?)",
                    (200 + i, trial, str(i), json.dumps(json.dumps({"default": value}))))
    con.commit()
    con.close()


def test_best_finds_remote_trials_in_the_shared_folder_or_says_where_it_looked(tmp_path, monkeypatch):
    _fake_experiment(tmp_path / "exps", "remote1", {"aaaaa": 0.5, "bbbbb": 0.7})
    monkeypatch.delenv("YC_SHARED", raising=False)
    with pytest.raises(UserError) as info:  # as on the manager of a remote experiment: artifacts are elsewhere
        best_trial(trials_from_disk("remote1", tmp_path / "exps"))
    message = str(info.value)
    assert "2 SUCCEEDED trial(s) have no model.onnx" in message and "YC_SHARED is not set" in message
    assert "\n" not in message

    shared = tmp_path / "shared"
    for trial in ("aaaaa", "bbbbb"):
        folder = shared / "experiments" / "remote1" / trial
        folder.mkdir(parents=True)
        write_atomic(folder / "model.onnx", b"onnx")
        write_atomic(folder / "report.json", "{}")
    monkeypatch.setenv("YC_SHARED", str(shared))
    best = best_trial(trials_from_disk("remote1", tmp_path / "exps"))
    assert best.id == "bbbbb" and best.folder == shared / "experiments" / "remote1" / "bbbbb"


# ---------------------------------------------------------------------------------------------------------------------
# A real remote experiment: two SSH workers on this machine


def _netns_available() -> str | None:
    """None when this test can create network namespaces and SSH servers, else why not."""
    if not SSHD.is_file() or not shutil.which("ssh") or not shutil.which("ssh-keygen"):
        return "no OpenSSH server (Debian: apt-get install openssh-server)"
    if not shutil.which("ip") or os.geteuid() != 0:
        return "network namespaces need root and iproute2"
    name = f"ycprobe{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        return "this machine refuses network namespaces (ip netns add failed)"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    if not NNICTL.is_file():
        return "nnictl is not installed beside this python"
    return None


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


def _start_sshd(folder: Path, address: str, port: int, authorized: Path, netns: str | None = None):
    """An OpenSSH server for root with its own HOME (sshd's SetEnv), key login only; returns the running process."""
    home = folder / "home"
    home.mkdir(parents=True)
    _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "host_key"))
    (folder / "sshd_config").write_text(f"""Port {port}
ListenAddress {address}
HostKey {folder / 'host_key'}
PidFile {folder / 'sshd.pid'}
AuthorizedKeysFile {authorized}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
SetEnv HOME={home} PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
""")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder (Debian's package makes it at boot)
    cmd = [str(SSHD), "-D", "-e", "-f", str(folder / "sshd_config")]
    log = open(folder / "sshd.log", "w")
    proc = subprocess.Popen((["ip", "netns", "exec", netns] if netns else []) + cmd, stdout=log, stderr=log)
    deadline = time.time() + 20
    while time.time() < deadline:
        probe = subprocess.run((["ip", "netns", "exec", netns] if netns else []) + [
            sys.executable, "-c", f"import socket; socket.create_connection(('{address}', {port}), 1)"],
            capture_output=True)
        if probe.returncode == 0:
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"sshd did not start: {(folder / 'sshd.log').read_text()[-500:]}")


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """Two SSH workers: ``lo`` on 127.0.0.1, ``ns`` inside a network namespace reached over a veth pair."""
    why = _netns_available()
    if why:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("remote")
    key = tmp / "client_key"
    _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
    authorized = tmp / "authorized_keys"
    shutil.copyfile(key.with_suffix(".pub"), authorized)
    tag = f"{os.getpid() % 100000}"
    netns, veth, subnet = f"yc{tag}", f"ycv{tag}", f"10.213.{random.randrange(1, 250)}"
    procs = []
    try:
        _sh("ip", "netns", "add", netns)
        _sh("ip", "link", "add", f"{veth}a", "type", "veth", "peer", "name", f"{veth}b")
        _sh("ip", "link", "set", f"{veth}b", "netns", netns)
        _sh("ip", "addr", "add", f"{subnet}.1/30", "dev", f"{veth}a")
        _sh("ip", "link", "set", f"{veth}a", "up")
        for args in (("addr", "add", f"{subnet}.2/30", "dev", f"{veth}b"), ("link", "set", f"{veth}b", "up"),
                     ("link", "set", "lo", "up")):
            _sh("ip", "netns", "exec", netns, "ip", *args)
        lo_port = _free_port()
        procs.append(_start_sshd(tmp / "lo", "127.0.0.1", lo_port, authorized))
        procs.append(_start_sshd(tmp / "ns", f"{subnet}.2", 22, authorized, netns))
        yield {"tmp": tmp, "key": key, "manager_ip": f"{subnet}.1",
               "hosts": {"lo": f"root@127.0.0.1:{lo_port}", "ns": f"root@{subnet}.2:22"},
               "homes": {"lo": tmp / "lo" / "home", "ns": tmp / "ns" / "home"}, "pids": [p.pid for p in procs]}
    finally:
        for proc in procs:  # only the servers this test started, by their PIDs
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)  # takes the veth pair with it
        subprocess.run(["ip", "link", "del", f"{veth}a"], capture_output=True)


def _remote(workers, env: dict, *args: str) -> subprocess.CompletedProcess:
    hosts = " ".join(workers["hosts"].values())
    return subprocess.run([sys.executable, "-m", "compression", "remote", "--hosts", hosts, "--key",
                           str(workers["key"]), *args], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def remote_experiment(workers, tiny_yolov5, tiny_data):
    """``python -m compression remote`` over both workers: a 2-trial search of the real trial.py at 64 px."""
    from conftest import write_yolov5_checkpoint

    tmp = workers["tmp"]
    (tmp / "manager").mkdir()
    shared = tmp / "shared"
    shared.mkdir()
    base = yaml.safe_load((ROOT / "experiment.yml").read_text())  # the shipped trial command, a smaller search
    base.pop("searchSpaceFile")
    base.pop("assessor", None)
    base.update(searchSpace={"sparsity": {"_type": "choice", "_value": [0.0, 0.25]}}, maxTrialNumber=2,
                maxExperimentDuration="8m")
    (tmp / "base.yml").write_text(yaml.safe_dump(base))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YC_", "YOLO_COMPRESS", "NNI_"))}
    env.update(HOME=str(tmp / "manager"),  # this test's own ~/nni-experiments and ~/.ssh/known_hosts
               PATH=f"{NNICTL.parent}{os.pathsep}{env['PATH']}",
               YC_WEIGHTS=str(write_yolov5_checkpoint(tiny_yolov5, tmp / "tiny.pt")), YC_DATA=str(tiny_data),
               YC_IMGSZ="64", YC_BUDGET=TINY_BUDGET)
    started = time.time()
    r = _remote(workers, env, "--shared", str(shared), "--manager-ip", workers["manager_ip"], "--port", str(port),
                "--config", str(tmp / "base.yml"))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    exp_id = summary["experiment"]
    try:
        deadline, jobs = time.time() + 420, []
        while time.time() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/nni/trial-jobs", timeout=10) as resp:
                jobs = json.load(resp)
            if len(jobs) == 2 and all(j["status"] not in ("WAITING", "RUNNING") for j in jobs):
                break
            time.sleep(3)
        yield {"id": exp_id, "port": port, "jobs": jobs, "env": env, "shared": shared, "summary": summary,
               "root": tmp / "manager" / "nni-experiments", "seconds": time.time() - started}
    finally:
        subprocess.run([str(NNICTL), "stop", exp_id], capture_output=True, timeout=60, env=env)


@pytest.mark.slow
def test_two_trials_succeed_on_two_workers_with_their_artifacts_in_the_shared_folder(remote_experiment, workers):
    exp = remote_experiment
    assert [j["status"] for j in exp["jobs"]] == ["SUCCEEDED", "SUCCEEDED"], exp["jobs"]
    ran_on = {}
    for job in exp["jobs"]:
        trial = job["trialJobId"]
        ran_on[trial] = [w for w, home in workers["homes"].items()
                         if list((home / "nni-experiments" / exp["id"]).glob(f"environments/*/trials/{trial}"))]
        folder = exp["shared"] / "experiments" / exp["id"] / trial
        assert (folder / "model.onnx").is_file() and (folder / "report.json").is_file(), list(folder.iterdir())
        assert json.loads((folder / "report.json").read_text())["final"]["default"] > 0
    assert sorted(w for found in ran_on.values() for w in found) == ["lo", "ns"], ran_on  # one trial on each
    assert list((exp["shared"] / "cache" / "baselines").glob("*.json"))  # the caches are shared too
    print(json.dumps({"experiment": exp["id"], "ran_on": ran_on, "seconds": round(exp["seconds"]),
                      "shared": sorted(str(p.relative_to(exp["shared"])) for p in exp["shared"].rglob("*")
                                       if p.is_file())}, indent=1))


@pytest.mark.slow
def test_best_exports_the_best_remote_trial_from_the_shared_folder(remote_experiment, tmp_path):
    exp = remote_experiment
    cmd = [sys.executable, "-m", "compression", "best", "--experiment", exp["id"], "--root", str(exp["root"]),
           "--out", str(tmp_path / "best.onnx")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=exp["env"], cwd=ROOT)
    assert r.returncode == 2 and "YC_SHARED is not set" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run(cmd + ["--shared", str(exp["shared"])], capture_output=True, text=True, timeout=120,
                       env=exp["env"], cwd=ROOT)
    assert r.returncode == 0, r.stderr
    picked = json.loads(r.stdout.strip().splitlines()[-1])
    finals = {j["trialJobId"]: json.loads(json.loads(j["finalMetricData"][-1]["data"]))["default"]
              for j in exp["jobs"]}
    assert picked["trial"] == max(finals, key=finals.get)
    assert onnx_session(tmp_path / "best.onnx").get_inputs()[0].shape[1] == 3

    # the running experiment's REST API, and the report, find the same files through YC_SHARED
    env = {**exp["env"], "YC_SHARED": str(exp["shared"])}
    r = subprocess.run([sys.executable, "-m", "compression", "best", "--experiment", exp["id"], "--port",
                        str(exp["port"]), "--out", str(tmp_path / "best_rest.onnx")],
                       capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["trial"] == picked["trial"], r.stderr
    r = subprocess.run([sys.executable, "-m", "compression", "report", "--experiment", exp["id"], "--root",
                        str(exp["root"]), "--out", str(tmp_path / "report"), "--no-reference"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["trials"] == 2, r.stderr


@pytest.mark.slow
def test_a_manager_address_the_workers_cannot_reach_stops_before_nni_starts(workers, tmp_path):
    """127.0.0.1 is the namespaced worker's own loopback: NNI's worker there would dial itself and hang."""
    env = {**os.environ, "HOME": str(tmp_path), "YC_WEIGHTS": str(ROOT / "trial.py"), "YC_DATA": str(ROOT / "trial.py")}
    r = _remote(workers, env, "--shared", str(tmp_path), "--manager-ip", "127.0.0.1", "--port",
                str(_free_port()), "--check")
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and f"worker {workers['hosts']['ns']}: cannot reach nniManagerIp 127.0.0.1" in line
    assert workers["hosts"]["lo"] not in line  # the loopback worker reaches it
