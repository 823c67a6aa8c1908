"""Trials on other machines over SSH: NNI 3.0's remote training service, set up so that it works as shipped.

``python -m compression remote --hosts "user@h1 user@h2:2222" --shared /mnt/yc`` (``make experiment-remote``):

1. writes ``runs/remote/experiment-<hash>.yml``: the search of ``experiment.yml`` (tuner, assessor, search space,
   trial count, trial command) with the training service of ``experiment.remote.yml``, the hosts given,
   ``nniManagerIp``, absolute paths, and ``YC_SHARED`` set for the trials;
2. checks every worker before NNI starts: SSH login with the key, its Python (NNI 3.0 and our dependencies), the
   weights and dataset at the paths the trials use, the shared folder (a token written here must be read there),
   and a TCP connection back to ``nniManagerIp``, the address NNI's trial keepers dial: wrong or unset, NNI's
   workers fail where no dashboard shows it and the experiment waits forever. Problems end it with one line;
3. runs ``nnictl create`` (not with ``check_only``).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import secrets
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from compression.errors import UserError
from compression.runtime import write_atomic

ROOT = Path(__file__).resolve().parents[1]  # the trial code directory NNI uploads (filtered by .nniignore)
PATH_VARIABLES = ("YC_WEIGHTS", "YC_DATA")  # trial-command variables that name files: made absolute for the workers
_EXPANSION = re.compile(r"\$\{(YC_\w+):-([^}]*)\}")  # ${YC_NAME:-default}, as experiment.yml's trialCommand uses
_UNSAFE = re.compile(r"[\"$`\\\n]")
# What a worker's Python must import for trial.py (module names, not distribution names).
WORKER_MODULES = ("torch", "torchvision", "ultralytics", "torch_pruning", "onnx", "onnxruntime", "cv2", "yaml")
SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "StrictHostKeyChecking=accept-new")

# Runs on each worker (python - ARGS): one JSON list of problems on stdout, empty when the worker is ready.
_WORKER_CHECK = r"""
import importlib.metadata, importlib.util, json, os, socket, sys, uuid
a, problems = json.loads(sys.argv[1]), []
missing = [m for m in a["modules"] if importlib.util.find_spec(m) is None]
if missing:
    problems.append(f"{sys.executable} cannot import {', '.join(missing)} (install the project there: make install)")
try:
    nni = importlib.metadata.version("nni")
    if nni != a["nni"]:
        problems.append(f"{sys.executable} has nni {nni}, this machine {a['nni']}: NNI needs the same version")
except importlib.metadata.PackageNotFoundError:
    problems.append(f"{sys.executable} has no nni (install the project there: make install)")
for what, path in a["files"].items():
    if not os.path.isfile(path):
        problems.append(f"{what} {path} not found (the trials read it at this path)")
token = os.path.join(a["shared"], ".checks", a["token"])
try:
    with open(token) as f:
        same = f.read() == a["token"]
    probe = f"{token}.{uuid.uuid4().hex}"
    open(probe, "w").close()
    os.remove(probe)
except OSError as e:
    same = None
    problems.append(f"shared folder {a['shared']} is not this machine's (not mounted, or not writable): {e.strerror}")
if same is False:
    problems.append(f"shared folder {a['shared']} holds another token: not the same folder as this machine's")
try:
    socket.create_connection((a["ip"], a["port"]), timeout=5).close()
except OSError as e:
    problems.append(f"cannot reach nniManagerIp {a['ip']}:{a['port']} ({e.strerror or e}): set MANAGER_IP "
                    f"(--manager-ip) to an address of this machine that the worker reaches")
print(json.dumps(problems))
"""


@dataclass(frozen=True)
class Host:
    user: str
    host: str
    port: int = 22

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


def parse_hosts(text: str) -> list[Host]:
    """``"user@host[:port] ..."`` (spaces or commas between; the user defaults to this machine's)."""
    hosts = []
    for item in re.split(r"[\s,]+", text.strip()):
        if not item:
            continue
        found = re.fullmatch(r"(?:([\w.-]+)@)?([\w.-]+|\[[0-9a-fA-F:]+\])(?::(\d{1,5}))?", item)
        if not found or not 0 < int(found.group(3) or 22) < 65536:
            raise UserError(f"host '{item}' is not user@host[:port]")
        hosts.append(Host(found.group(1) or getpass.getuser(), found.group(2).strip("[]"), int(found.group(3) or 22)))
    if not hosts:
        raise UserError("no hosts given: HOSTS (--hosts) lists the workers, e.g. 'ubuntu@10.0.0.2 ubuntu@10.0.0.3'")
    return hosts


def trial_command(template: str, env=os.environ, code_dir: Path = ROOT) -> str:
    """``template`` with each ``${YC_NAME:-default}`` replaced by the value a worker must see: ``env``'s, else the
    default; file paths absolute (resolved from ``code_dir``, where the trial command runs on this machine)."""
    def value(found: re.Match) -> str:
        name, default = found.group(1), found.group(2)
        text = env.get(name) or default
        if name in PATH_VARIABLES:
            text = str((code_dir / Path(text).expanduser()).resolve())
        if _UNSAFE.search(text):
            raise UserError(f"{name}='{text}' has a quote, $, backquote or backslash, which the trial command "
                            f"cannot carry")
        return text

    return _EXPANSION.sub(value, template)


def default_key() -> Path:
    for name in ("id_ed25519", "id_ecdsa", "id_rsa"):
        key = Path.home() / ".ssh" / name
        if key.is_file():
            return key
    raise UserError("no SSH key in ~/.ssh: KEY (--key) names a private key every worker accepts")


def remote_config(base: dict, overlay: dict, shared: Path, manager_ip: str, hosts: list[Host] | None = None,
                  key: Path | None = None, python: str | None = None, code_dir: Path = ROOT, env=os.environ,
                  base_dir: Path = ROOT) -> dict:
    """The NNI config of a remote experiment: ``base`` (experiment.yml) under ``overlay`` (experiment.remote.yml).

    Args:
        base_dir: the folder of the base config file, which NNI resolves its relative paths from.
        hosts: the workers; None keeps the overlay's ``machineList``.
        key, python: SSH key and the workers' Python folder (``pythonPath``) for ``hosts``.
        shared: the folder every machine mounts at this path (``YC_SHARED`` of the trials).
    """
    config = {**base, **{k: v for k, v in overlay.items() if k != "trainingService"}}
    service = dict(overlay["trainingService"])
    if hosts is not None:
        service["machineList"] = [{"host": h.host, "port": h.port, "user": h.user, "sshKeyFile": str(key),
                                   "pythonPath": python} for h in hosts]
    machines = service.get("machineList") or []
    if not machines:
        raise UserError("no workers: give HOSTS (--hosts) or a machineList in experiment.remote.yml")
    config["trainingService"] = service
    config["nniManagerIp"] = manager_ip
    if not config.get("trialConcurrency"):
        config["trialConcurrency"] = len(machines)  # one trial per worker: a trial uses every core it is given
    config["trialCodeDirectory"] = str(code_dir)
    if "searchSpaceFile" in base:
        config["searchSpaceFile"] = str((base_dir / base["searchSpaceFile"]).resolve())
    for algo in ("tuner", "assessor"):  # a custom algorithm's folder is relative to experiment.yml, not to this file
        if isinstance(config.get(algo), dict) and "codeDirectory" in config[algo]:
            config[algo] = {**config[algo], "codeDirectory": str((base_dir / config[algo]["codeDirectory"]).resolve())}
    command = trial_command(base["trialCommand"], env, code_dir)
    config["trialCommand"] = f"YC_SHARED={shlex.quote(str(shared))} {command}"
    return config


def guess_manager_ip(host: str, port: int = 22) -> str:
    """The address this machine sends from to reach ``host``: the one a worker most likely reaches it at."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))  # UDP: picks the route and source address, sends nothing
            return s.getsockname()[0]
    except OSError as e:
        raise UserError(f"no route to worker {host} ({e.strerror or e}): set MANAGER_IP (--manager-ip)") from None


def _ssh_check(machine: dict, args: str, timeout: float = 120) -> list[str]:
    """Run :data:`_WORKER_CHECK` on one worker with the Python NNI will use there; its problems, [] when ready.

    Connects as NNI does (the machine's key and port, nothing from ~/.ssh/config), so what passes here works there.
    """
    key = machine.get("sshKeyFile")
    if machine.get("password"):
        return ["password login cannot be checked (and NNI shows passwords in its web UI): give sshKeyFile"]
    if not (key and Path(key).expanduser().is_file()):
        return [f"SSH key {key} not found here (KEY, --key, or sshKeyFile)"]
    path = machine.get("pythonPath")  # NNI puts it first on PATH, then runs python or python3
    command = (f"PATH={shlex.quote(path)}:$PATH " if path else "") + "python3 - " + shlex.quote(args)
    try:
        r = subprocess.run(["ssh", *SSH_OPTIONS, "-F", "/dev/null", "-i", str(Path(key).expanduser()), "-p",
                            str(machine.get("port", 22)), f"{machine['user']}@{machine['host']}", command],
                           input=_WORKER_CHECK, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ["the check timed out"]
    last = (r.stderr.strip().splitlines() or ["no output"])[-1]
    if r.returncode == 255:  # ssh's own failure
        return [f"ssh login failed ({last})"]
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return [f"its python did not run the check ({last}; pythonPath: {path or 'unset'})"]


def check_workers(config: dict, shared: Path, port: int) -> None:
    """Raise ``UserError`` (one line, every problem of every worker) unless each worker can run the trials.

    Args:
        config: the remote NNI config (:func:`remote_config`); the files checked are those its trial command reads.
        shared: the shared folder, as mounted here; port: the port NNI will listen on.
    """
    import importlib.metadata

    ip, words = config["nniManagerIp"], shlex.split(config["trialCommand"])
    files = {what: words[words.index(flag) + 1] for flag, what in (("--weights", "weights"), ("--data", "dataset"))
             if flag in words[:-1]}
    token = secrets.token_hex(8)
    (shared / ".checks").mkdir(parents=True, exist_ok=True)
    write_atomic(shared / ".checks" / token, token)
    listener = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
    try:
        try:
            listener.bind((ip, port))  # NNI listens here next; workers must reach it
        except OSError as e:
            raise UserError(f"cannot listen on nniManagerIp {ip} port {port} ({e.strerror}): not an address of this "
                            f"machine, or the port is taken (MANAGER_IP, PORT)") from None
        listener.listen(16)  # the kernel completes the workers' handshakes; nothing needs accepting
        args = json.dumps({"modules": WORKER_MODULES, "nni": importlib.metadata.version("nni"), "ip": ip, "port": port,
                           "files": files, "shared": str(shared), "token": token})
        problems = [f"worker {m['user']}@{m['host']}:{m.get('port', 22)}: {problem}"
                    for m in config["trainingService"]["machineList"] for problem in _ssh_check(m, args)]
    finally:
        listener.close()
        (shared / ".checks" / token).unlink(missing_ok=True)
    if problems:
        raise UserError("; ".join(problems))


def write_config(config: dict, folder: Path = ROOT / "runs" / "remote") -> Path:
    text = ("# Written by `python -m compression remote` from experiment.yml and experiment.remote.yml.\n"
            + yaml.safe_dump(config, sort_keys=False))
    path = folder / f"experiment-{hashlib.sha1(text.encode()).hexdigest()[:8]}.yml"
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)
    return path


def start(config_path: Path, port: int) -> str:
    """``nnictl create``; returns the experiment id."""
    nnictl = Path(sys.executable).parent / "nnictl"
    env = {**os.environ, "PATH": f"{nnictl.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run([str(nnictl), "create", "--config", str(config_path), "--port", str(port)],
                       capture_output=True, text=True, timeout=300, env=env)
    found = re.search(r"nnictl stop (\w+)", r.stdout + r.stderr)
    if r.returncode != 0 or not found:
        last = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()][-1:] or ["no output"]
        raise UserError(f"nnictl create failed: {last[0].strip()}")
    return found.group(1)


def launch(shared: str | Path, hosts: str | None = None, manager_ip: str | None = None, key: str | None = None,
           python: str | None = None, port: int = 8080, check_only: bool = False,
           base: Path = ROOT / "experiment.yml", overlay: Path = ROOT / "experiment.remote.yml") -> dict:
    """Write the remote config, check every worker, start NNI (see the module docstring); a JSON-ready summary."""
    if not shared:
        raise UserError("SHARED (--shared) must name a folder every machine mounts at the same path "
                        "(caches and each trial's model.onnx and report.json go there)")
    shared = Path(shared).expanduser().resolve()
    if not shared.is_dir():
        raise UserError(f"shared folder {shared} not found on this machine")
    overlay_cfg = yaml.safe_load(overlay.read_text())
    parsed = parse_hosts(hosts) if hosts else None
    key_path = Path(key).expanduser() if key else (default_key() if parsed else None)
    if key_path is not None and not key_path.is_file():
        raise UserError(f"SSH key {key_path} not found")
    base = Path(base)
    if not base.is_file():
        raise UserError(f"experiment config {base} not found")
    config = remote_config(yaml.safe_load(base.read_text()), overlay_cfg, shared,
                           manager_ip or overlay_cfg.get("nniManagerIp") or "", parsed, key_path,
                           python or str(Path(sys.executable).parent), base_dir=base.resolve().parent)
    first = config["trainingService"]["machineList"][0]
    ip = config["nniManagerIp"] = config["nniManagerIp"] or guess_manager_ip(first["host"], first.get("port", 22))
    path = write_config(config)
    check_workers(config, shared, port)
    summary = {"config": str(path), "nniManagerIp": ip, "shared": str(shared),
               "workers": [f"{m['user']}@{m['host']}:{m.get('port', 22)}" for m in
                           config["trainingService"]["machineList"]]}
    if check_only:
        return {**summary, "checked": True}
    exp_id = start(path, port)
    return {**summary, "experiment": exp_id, "dashboard": f"http://{ip}:{port}",
            "best": f"YC_SHARED={shared} python -m compression best --experiment {exp_id} --out best.onnx"}
