"""dtp_ds.launch without a cluster: Slurm / PBS allocations to hostfiles, hostname and env-file
rules, partition shapes, rank discovery, the pre-flight verdicts, and the batch scripts' logic
(dry runs with a faked Slurm environment)."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dtp_ds.launch import check, discovery, envfile
from dtp_ds.launch.hostfile import HostfileError, check_partition, format_hostfile, parse_hostfile, read_hostfile
from dtp_ds.launch.hostnames import HostnameError, validate_hostname
from dtp_ds.launch.nodelist import NodeListError, expand_nodelist, parse_pbs_nodefile, slurm_gpus_per_node
from dtp_ds.launch.probe import MODULES
from tests.conftest import REPO

MAKE_HOSTFILE = str(REPO / "tools" / "make_hostfile")


@pytest.mark.parametrize("text,hosts", [
    ("p0201", ["p0201"]),
    ("p[0201-0203,0305]", ["p0201", "p0202", "p0203", "p0305"]),
    ("p[0201-0202],q07", ["p0201", "p0202", "q07"]),
    ("p[01-02],q[8-11]", ["p01", "p02", "q8", "q9", "q10", "q11"]),  # zero padding only where written
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),  # several bracket groups: the product
    ("p[01-02]-ib", ["p01-ib", "p02-ib"]),
    ("a[1,3,5-6],b,c[00-01]", ["a1", "a3", "a5", "a6", "b", "c00", "c01"]),
    ("node.cluster.edu,127.0.0.1", ["node.cluster.edu", "127.0.0.1"]),
    ("gpu[7]", ["gpu7"]),
])
def test_expand_slurm_nodelist(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize("text,rule", [
    ("", "empty"),
    ("a,,b", "empty entry"),
    ("p[1-2", "without a matching ']'"),
    ("p1-2]", "without a matching '['"),
    ("p[1-[2]]", "nested"),
    ("p[5-3]", "runs backwards"),
    ("p[a-b]", "is not N or N-M"),
    ("p[1-2],p2", "listed more than once"),
    ("p[0-99999999]", "more than"),
    ("a;rm -rf x", "not allowed"),
    ("$(id)", "not allowed"),
    ("p[1-2]`id`", "not allowed"),
])
def test_nodelist_refusals_name_the_rule(text, rule):
    with pytest.raises((NodeListError, HostnameError), match=re.escape(rule)):
        expand_nodelist(text)


@pytest.mark.parametrize("name,rule", [
    ("a;rm -rf x", "';'"),
    ("a;rm -rf x", "whitespace"),
    ("$(id)", "'$'"),
    ("`id`", "'`'"),
    ("a b", "whitespace"),
    ("tab\there", "whitespace"),
    ("", "empty"),
    ("-oProxyCommand", "starts or ends with '-'"),
    ("host-", "starts or ends with '-'"),
    ("a..b", "empty label"),
    ("a_b", "'_'"),
    ("x" * 64, "63"),
    (".".join(["abcdefgh"] * 30), "253"),
    ("host\nname", "whitespace"),
    ("h/../x", "'/'"),
])
def test_hostile_hostnames_refused(name, rule):
    with pytest.raises(HostnameError, match=re.escape(rule)):
        validate_hostname(name)


@pytest.mark.parametrize("name", ["p0201", "localhost", "127.0.0.1", "node-1.ten.osc.edu", "A0001", "x" * 63])
def test_good_hostnames(name):
    assert validate_hostname(name) == name


@pytest.mark.parametrize("env,expect", [
    ({"SLURM_GPUS_ON_NODE": "4"}, (4, "SLURM_GPUS_ON_NODE")),
    ({"SLURM_GPUS_PER_NODE": "v100:2"}, (2, "SLURM_GPUS_PER_NODE")),
    ({"SLURM_GPUS_PER_NODE": "gpu:a100:4"}, (4, "SLURM_GPUS_PER_NODE")),
    ({"SLURM_JOB_GPUS": "0,1,2"}, (3, "SLURM_JOB_GPUS")),
    ({"SLURM_STEP_GPUS": "0-3"}, (4, "SLURM_STEP_GPUS")),
    ({"SLURM_TRES_PER_NODE": "gres/gpu:2"}, (2, "SLURM_TRES_PER_NODE")),
    ({"SLURM_TRES_PER_NODE": "gres/nvme:1,gres/gpu:v100:2"}, (2, "SLURM_TRES_PER_NODE")),
    ({"SLURM_GPUS": "8"}, (4, "SLURM_GPUS")),  # job total over 2 nodes
    ({"SLURM_GPUS_ON_NODE": "2", "SLURM_GPUS_PER_NODE": "4"}, (2, "SLURM_GPUS_ON_NODE")),
])
def test_slurm_gpus_per_node(env, expect):
    assert slurm_gpus_per_node(env, num_nodes=2) == expect


@pytest.mark.parametrize("env,rule", [
    ({}, "no GPU count"),
    ({"SLURM_GPUS_ON_NODE": "0"}, "no GPUs on the node"),
    ({"SLURM_GPUS": "3"}, "does not divide evenly"),
    ({"SLURM_GPUS_PER_NODE": "lots"}, "cannot read a GPU count"),
])
def test_slurm_gpus_refusals(env, rule):
    with pytest.raises(NodeListError, match=rule):
        slurm_gpus_per_node(env, num_nodes=2)


def test_pbs_nodefile_and_gpufile():
    text = "p0201\np0201\np0202\np0202\n"
    assert parse_pbs_nodefile(text) == [("p0201", 2), ("p0202", 2)]
    gpus = "p0201-gpu0\np0201-gpu1\np0201-gpu2\np0202-gpu0\np0202-gpu1\np0202-gpu2\n"
    assert parse_pbs_nodefile(text, gpus) == [("p0201", 3), ("p0202", 3)]
    with pytest.raises(HostnameError):
        parse_pbs_nodefile("p0201\n$(id)\n")
    with pytest.raises(NodeListError, match="no GPU on p0202"):
        parse_pbs_nodefile(text, "p0201-gpu0\n")


def test_hostfile_roundtrip_and_strictness():
    entries = [("p0201", 2), ("p0202", 2)]
    assert parse_hostfile("# comment\n\n" + format_hostfile(entries)) == entries
    for bad, rule in [("p0201 slots=x\n", "not a positive integer"), ("p0201 slots=0\n", "not a positive integer"),
                      ("p0201\n", "is not 'HOST slots=N'"), ("a;b slots=1\n", "';'"),
                      ("p1 slots=1\np1 slots=2\n", "listed twice"), ("# nothing\n", "lists no hosts")]:
        with pytest.raises(HostfileError, match=re.escape(rule)):
            parse_hostfile(bad)


def test_every_shipped_hostfile_loads_and_fits_its_partition():
    files = sorted(p for p in (REPO / "hostfiles").iterdir() if p.name != "README.md")
    assert {p.name for p in files} >= {"loopback", "ascend-quad-2x4", "pitzer-gpuparallel-48core-2x2"}
    for path in files:
        entries = read_hostfile(str(path))
        m = re.fullmatch(r"(pitzer|ascend)-(.+)-(\d+)x(\d+)", path.name)
        if path.name == "loopback":
            assert entries == [("localhost", 1), ("127.0.0.1", 1)]
            continue
        assert m, f"hostfiles/{path.name}: name is not CLUSTER-PARTITION-NxG"
        assert len(entries) == int(m.group(3)) and {n for _, n in entries} == {int(m.group(4))}, path.name
        assert check_partition(entries, f"{m.group(1)}:{m.group(2)}") == f"{m.group(1)}:{m.group(2)}"


@pytest.mark.parametrize("shape,spec,rule", [
    ((2, 2), "pitzer:gpuserial", "max_nodes_per_job"),
    ((1, 8), "pitzer:gpuserial", "max_gpus_per_"),  # CONTEXT.md: 8 GPUs in one job "exceeds limit"
    ((4, 4), "pitzer:gpuparallel-48core", "node count"),
    ((2, 4), "ascend:nextgen", "max_gpus_per_node"),
    ((2, 2), "ascend:nope", "unknown partition"),
    ((2, 2), "ascend", "expected CLUSTER:PARTITION"),
])
def test_partition_refuses_shapes(shape, spec, rule):
    entries = [(f"n{i}", shape[1]) for i in range(shape[0])]
    with pytest.raises(HostfileError, match=re.escape(rule)):
        check_partition(entries, spec)


@pytest.mark.parametrize("shape,spec", [((2, 2), "pitzer:gpuparallel-48core"), ((2, 4), "pitzer:gpuparallel-48core"),
                                        ((4, 2), "pitzer:gpuparallel-48core"), ((1, 2), "pitzer:gpuserial"),
                                        ((2, 4), "ascend:quad")])
def test_partition_accepts_shapes_users_ran(shape, spec):
    # check_partition returns the label of the partition that accepted the job (it raises on refusal)
    assert check_partition([(f"n{i}", shape[1]) for i in range(shape[0])], spec) == spec


def _make_hostfile(*args: str, env: dict[str, str] | None = None, poison: Path | None = None):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PBS_"))}
    if poison is not None:  # a torch that cannot import: the tool must not need it
        base["PYTHONPATH"] = str(poison)
    return subprocess.run([sys.executable, MAKE_HOSTFILE, *args], env={**base, **(env or {})}, capture_output=True,
                          text=True, timeout=60)


def test_make_hostfile_tool_from_slurm_env_without_torch(tmp_path):
    (tmp_path / "torch.py").write_text("raise ImportError('make_hostfile must not import torch')\n")
    out = tmp_path / "hf"
    p = _make_hostfile("--partition", "pitzer:gpuparallel-48core", "--out", str(out),
                       env={"SLURM_JOB_NODELIST": "p[0241-0242]", "SLURM_GPUS_ON_NODE": "2"}, poison=tmp_path)
    assert p.returncode == 0, p.stderr
    assert out.read_text() == "p0241 slots=2\np0242 slots=2\n"
    assert "slots from SLURM_GPUS_ON_NODE" in p.stderr and "accepted by pitzer:gpuparallel-48core" in p.stderr


@pytest.mark.parametrize("args,env,rule", [
    (["--nodelist", "a;rm -rf x", "--gpus-per-node", "1"], {}, "refused hostname 'a;rm -rf x'"),
    (["--nodelist", "$(id)", "--gpus-per-node", "1"], {}, "refused hostname '$(id)'"),
    (["--nodelist", "a b", "--gpus-per-node", "1"], {}, "whitespace"),
    (["--nodelist", "", "--gpus-per-node", "1"], {}, "node list is empty"),
    (["--nodelist=-oProxyCommand", "--gpus-per-node", "1"], {}, "starts or ends with '-'"),
    (["--partition", "pitzer:gpuserial"], {"SLURM_JOB_NODELIST": "p[1-2]", "SLURM_GPUS_ON_NODE": "2"},
     "max_nodes_per_job"),
    (["--partition", "pitzer:gpuparallel-48core", "--nodelist", "p[0301-0304]", "--gpus-per-node", "4"], {},
     "node count"),
    ([], {}, "not inside a Slurm or PBS job"),
    (["--nodelist", "p1", "--gpus-per-node", "0"], {}, "must be at least 1"),
    (["--nodelist", "p1", "--gpus-per-node", "1", "--deepspeed-env", "/dev/null", "--env", "WANDB_API_KEY=x"], {},
     "looks like a secret"),
])
def test_make_hostfile_tool_refusals(args, env, rule, tmp_path):
    out = tmp_path / "hf"
    p = _make_hostfile(*args, "--out", str(out), env=env)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert p.stderr.startswith("make_hostfile: error:") and rule in p.stderr, p.stderr
    assert not out.exists(), "a refused allocation must write nothing"


def test_make_hostfile_tool_pbs(tmp_path):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("a0001\na0001\na0002\na0002\n")
    p = _make_hostfile(env={"PBS_NODEFILE": str(nodefile)})
    assert p.returncode == 0 and p.stdout == "a0001 slots=2\na0002 slots=2\n", p.stderr


def test_env_file_rules(tmp_path):
    variables = envfile.collect(env={"NCCL_SOCKET_IFNAME": "ib0", "WANDB_API_KEY": "s3cret", "HOME": "/root",
                                     "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}, repo="/work/repo")
    assert variables["NCCL_SOCKET_IFNAME"] == "ib0" and variables["PYTHONPATH"] == "/work/repo"
    assert "WANDB_API_KEY" not in variables and "HOME" not in variables  # secrets skipped, not copied
    assert variables["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and variables["WANDB_MODE"] == "offline"
    path = tmp_path / "env"
    envfile.write_env(str(path), variables)
    lines = path.read_text().splitlines()
    assert all(re.fullmatch(r"[A-Z_]+=[^\s]*", ln) for ln in lines), lines  # what DeepSpeed's reader can split
    for name, value, rule in [("HF_TOKEN", "x", "looks like a secret"), ("FOO", "$(id)", "'$'"),
                              ("FOO", "a b", "' '"), ("FOO", 'a"b', "'\"'"), ("1X", "y", "not a shell identifier"),
                              ("FOO", "`id`", "'`'")]:
        with pytest.raises(envfile.EnvFileError, match=re.escape(rule)):
            envfile.check_var(name, value)


def test_one_secret_rule_keeps_nccl_ib_pkey_and_drops_real_secrets():
    from dtp_ds.train.redact import MASK, redact_obj, secret_values

    secrets = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "WANDB_API_KEY", "HF_TOKEN", "DB_PASSWORD",
               "GITHUB_AUTH", "OPENAI_KEY")
    env = {"NCCL_IB_PKEY": "0x8001", "__key__": "sample-000001", **{n: f"value-{n.lower()}" for n in secrets}}
    # the launch: NCCL's InfiniBand partition key reaches the nodes, secrets do not
    variables = envfile.collect(env=env, pass_through=(*envfile.PASS_THROUGH, *secrets))
    assert variables["NCCL_IB_PKEY"] == "0x8001" and not set(secrets) & set(variables)
    envfile.check_var("NCCL_IB_PKEY", "0x8001")
    for name in secrets:
        with pytest.raises(envfile.EnvFileError, match="looks like a secret"):
            envfile.check_var(name, "x")
    # the run's files: the same names are masked
    assert sorted(secret_values(env)) == sorted(f"value-{n.lower()}" for n in secrets)
    assert redact_obj(env, secrets=[]) == {"NCCL_IB_PKEY": "0x8001", "__key__": "sample-000001",
                                           **dict.fromkeys(secrets, MASK)}


def test_discovery_sources(monkeypatch):
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert discovery.discover(dict(env)).startswith("launcher")
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
             "SLURM_JOB_ID": "12345", "SLURM_JOB_NODELIST": "p[0201-0202]"}
    env = dict(slurm)
    assert discovery.discover(env) == "Slurm (srun)"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"], env["MASTER_PORT"]) == \
        ("3", "4", "1", "p0201", "32345")
    env = {**slurm, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "2999"}
    discovery.discover(env)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.1", "2999")  # kept, unlike DeepSpeed's discovery
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # the variables-only path (no MPI init in this process)
    env = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "MASTER_ADDR": "p0201", **slurm}  # mpirun inside sbatch: the MPI rank wins over SLURM_PROCID
    assert discovery.discover(env) == "MPI (OMPI_COMM_WORLD_RANK)"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "1")
    with pytest.raises(discovery.DiscoveryError, match="MASTER_ADDR"):
        discovery.discover({"PMI_RANK": "0", "PMI_SIZE": "2"})
    with pytest.raises(discovery.DiscoveryError, match="incomplete"):
        discovery.discover({"RANK": "0"})


def _probe(git="abc", source="s1", torch="2.1", gpus=0, names=(), bad_import=None):
    imports = {m: {"ok": True, "version": torch if m == "torch" else "1.0"} for m in MODULES}
    if bad_import:
        imports[bad_import] = {"ok": False, "error": "ModuleNotFoundError: No module named 'x'"}
    return {"revision": {"git": git, "source": source}, "imports": imports, "gpus": gpus, "gpu_names": list(names)}


def test_preflight_verdicts():
    local = {"git": "abc", "source": "s1"}
    entries = [("h1", 2), ("h2", 2), ("h3", 4), ("h4", 1), ("h5", 1), ("h6", 1)]
    results = {"h1": (_probe(gpus=2, names=["NVIDIA V100"]), ""),
               "h2": (_probe(source="s2"), ""),
               "h3": (_probe(gpus=2, names=["NVIDIA V100"]), ""),
               "h4": (_probe(bad_import="open_clip"), ""),
               "h5": (None, "ssh: connect to host h5 port 22: Connection refused"),
               "h6": (_probe(), "")}
    rows = {r["host"]: r for r in check.evaluate(entries, results, local)}
    assert rows["h1"]["problems"] == [] and rows["h1"]["gpu_text"] == "2 x NVIDIA V100"
    assert "code differs" in rows["h2"]["problems"][0]
    assert rows["h3"]["problems"] == ["slots=4 but only 2 GPUs visible"]
    assert rows["h4"]["problems"][0].startswith("import open_clip")
    assert rows["h5"]["ssh"] == "FAIL" and "Connection refused" in rows["h5"]["problems"][0]
    assert rows["h6"]["problems"] == [] and rows["h6"]["gpu_text"] == "0 (CPU only)"
    assert "ranks run on CPU" in rows["h6"]["notes"][0]
    rows = check.evaluate([("a", 1), ("b", 1)], {"a": (_probe(), ""), "b": (_probe(torch="2.2"), "")}, local)
    assert all("torch versions differ" in r["problems"][0] for r in rows)


def test_preflight_remote_command_is_quoted():
    cmd = check.remote_command(["/py thon", "probe.py", "info"], "/repo dir", {"A": "x y"}, 30)
    assert cmd == "cd '/repo dir' && exec env 'A=x y' timeout 30 '/py thon' probe.py info"
    argv = check.SSH(port=2222, options=["StrictHostKeyChecking=no"]).argv("p0201", cmd)
    assert argv[-3:] == ["--", "p0201", cmd] and ["-p", "2222"] == argv[5:7]


def _dry_run(script: str, env: dict[str, str], tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PBS_", "DS_ENV"))}
    full = {**base, "PATH": "/usr/local/bin:/usr/bin:/bin", "DRY_RUN": "1", "LOGS": str(tmp_path / "logs"),
            "SLURM_SUBMIT_DIR": str(REPO), "TRAIN_DATA": "/fs/shards/{00000..00099}.tar", **env}
    return subprocess.run(["bash", str(REPO / "tools" / "slurm" / script), *args], env=full, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_batch_scripts_dry_run(tmp_path):
    scripts = sorted(p.name for p in (REPO / "tools" / "slurm").glob("*.sbatch"))
    sizes = ("b_32", "b_16", "l_14", "h_14")
    assert {f"{c}_vit_{s}.sbatch" for c in ("pitzer", "ascend") for s in sizes} <= set(scripts)
    for script in scripts:
        assert subprocess.run(["bash", "-n", str(REPO / "tools" / "slurm" / script)]).returncode == 0, script
        config = re.search(r"DS_CONFIG=\$\{DS_CONFIG:-(\S+)\}", (REPO / "tools" / "slurm" / script).read_text())
        assert config and (REPO / config.group(1)).is_file(), f"{script}: {config and config.group(1)} missing"
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "pitzer_vit_l_14", "SLURM_JOB_NODELIST": "p[0301-0302]",
           "SLURM_GPUS_ON_NODE": "4"}
    p = _dry_run("pitzer_vit_l_14.sbatch", env, tmp_path, "--epochs", "5")
    assert p.returncode == 0, p.stderr
    launch = tmp_path / "logs" / ".launch" / "4242"
    assert (launch / "hostfile").read_text() == "p0301 slots=4\np0302 slots=4\n"
    dsenv = dict(line.split("=", 1) for line in (launch / "deepspeed_env").read_text().splitlines())
    assert dsenv["PYTHONPATH"].split(":")[0] == str(REPO) and dsenv["WANDB_MODE"] == "offline"
    cmd = p.stdout.strip()
    assert cmd.startswith(f"{REPO}/.venv/bin/deepspeed --hostfile {launch}/hostfile --master_addr p0301 "
                          f"--master_port 24242 --module dtp_ds.train")
    # every node's PATH starts with the interpreter's directory: the ninja that built DeepSpeed's ops
    # (import dtp_ds puts it first; dtp_ds.cluster.process_group.use_interpreter_ninja)
    assert dsenv["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    # the brace range reaches dtp_ds.train intact through pdsh's remote shell
    assert "--train-data \\'/fs/shards/\\{00000..00099\\}.tar\\'" in cmd
    assert "--deepspeed_config ds_configs/vit_l_14_fp16.json" in cmd and cmd.endswith("--epochs 5")
    # every other argument too: what the remote shell would interpret is quoted for it once ...
    p = _dry_run("pitzer_vit_l_14.sbatch", {**env, "SLURM_JOB_ID": "4245"}, tmp_path, "--zeroshot-data", "/fs/$(id)/z*")
    assert p.returncode == 0, p.stderr
    assert "'/fs/$(id)/z*'" in shlex.split(p.stdout)
    # ... and what cannot be quoted for it is refused before anything runs
    p = _dry_run("pitzer_vit_l_14.sbatch", {**env, "SLURM_JOB_ID": "4246"}, tmp_path, "--zeroshot-data", "/fs/a b")
    assert p.returncode == 2 and "cannot cross pdsh" in p.stderr and not p.stdout
    # a shape the partition refuses stops the job before anything runs
    p = _dry_run("pitzer_vit_l_14.sbatch", {**env, "SLURM_JOB_ID": "4243", "SLURM_JOB_NODELIST": "p[0301-0304]"},
                 tmp_path)
    assert p.returncode == 2 and "node count" in p.stderr and not p.stdout
    # other launchers: srun with rank discovery, MASTER_* shipped in the env file
    p = _dry_run("ascend_vit_b_16.sbatch", {**env, "SLURM_JOB_ID": "4244", "SLURM_GPUS_ON_NODE": "2",
                                            "SLURM_JOB_NODELIST": "a[0101-0102]", "LAUNCHER": "srun"}, tmp_path)
    assert p.returncode == 0, p.stderr
    assert "srun --ntasks=4 --ntasks-per-node=2" in p.stdout and "tools/slurm/train_entry.py" in p.stdout
    assert "--train-data /fs/shards/\\{00000..00099\\}.tar" in p.stdout and "ds_configs/vit_b_16.json" in p.stdout
    assert "MASTER_ADDR=a0101\n" in (tmp_path / "logs" / ".launch" / "4244" / "deepspeed_env").read_text()
