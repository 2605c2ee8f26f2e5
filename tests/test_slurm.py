"""The SLURM profile on a real SLURM cluster: Debian's munge, slurmctld and slurmd as a one-node cluster on
this machine. The tiny workflow runs once locally (`--cores 2`) and once through workflow/profiles/slurm;
the test checks that every job went through `sbatch` with the resources its rule declares, that the
results table and the MLflow runs are complete, and prints both wall times. The node also has 8 fake
GPUs (device files that are /dev/null), so that a job asking for `gpu: 8` like the paper's pre-training
can be submitted: the second test checks that such a job is one task, launched once, that holds all 8.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import BIN, REPO, TINY, run_snakemake

PROFILE = REPO / "workflow" / "profiles" / "slurm"
TASKS = {"vqa", "gqa", "nlvr2", "retrieval"}

SLURM_PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client")
SLURM_TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")
# The jobstep plugin drops SLURM_CONF from the environment of the `srun` it starts inside each job, so
# that srun reads the compiled-in default path: the test links it to its own slurm.conf while it runs.
DEFAULT_SLURM_CONF = Path("/etc/slurm/slurm.conf")
# The largest mem_mb a tiny-config rule declares: the node must offer at least that much.
LARGEST_JOB_MEM_MB = 8000
# The node's fake GPUs (gres.conf files: character devices that are /dev/null), as many as
# config/paper.yaml's pre-training asks for.
NODE_GPUS = 8
# The rules that run on GPUs in config/paper.yaml (resources: gpu >= 1).
GPU_RULES = {"pretrain_phase", "finetune", "extract_regions"}
# Options for this test cluster only, on top of the profile: it has no accounting database, so job
# states come from squeue (MinJobAge keeps finished jobs listed), and its jobs are seconds long, so
# the first status check comes early.
TEST_CLUSTER_OPTIONS = (
    "--slurm-status-command", "squeue",
    "--slurm-init-seconds-before-status-checks", "5",
    "--slurm-keep-successful-logs",
)  # fmt: skip


@dataclass
class SlurmCluster:
    """A running one-node cluster: its config, the environment its clients need, its daemons."""

    root: Path
    conf: Path
    node: str
    env: dict[str, str]
    gpus: int = 0  # fake GPUs the node has (0 where device files could not be made)
    daemons: list[subprocess.Popen] = field(default_factory=list)

    def command(self, *args: str, timeout: int = 60) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env={**os.environ, **self.env})

    def jobs(self) -> dict[str, dict[str, str]]:
        """Every job slurmctld still holds (finished ones for MinJobAge), as {job id: scontrol fields}."""
        listing = self.command("scontrol", "show", "job", "--oneliner").stdout
        jobs = {}
        for line in listing.splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            if "JobId" in fields:
                jobs[fields["JobId"]] = fields
        return jobs

    def node_is_idle(self) -> bool:
        state = self.command("sinfo", "--noheader", f"--nodes={self.node}", "--format=%t").stdout.strip()
        return state == "idle"  # "idle*" would mean slurmctld does not hear from slurmd

    def queue_is_empty(self) -> bool:
        return not self.command("squeue", "--noheader", "--states=PENDING,RUNNING,COMPLETING").stdout.strip()

    def log_tails(self, chars: int = 3000) -> str:
        """The end of every daemon log, for failure messages."""
        parts = []
        for log in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {log.name} ---\n{log.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)


def find_tool(name: str) -> str | None:
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")


def install_slurm() -> str | None:
    """Install the Debian packages when a tool is missing; return why not, or None on success."""
    if all(find_tool(tool) for tool in SLURM_TOOLS):
        return None
    if os.geteuid() != 0:
        return "SLURM is not installed and installing it with apt-get needs root"
    if not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *SLURM_PACKAGES]):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        if result.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {(result.stdout + result.stderr)[-1500:]}"
    missing = [tool for tool in SLURM_TOOLS if not find_tool(tool)]
    return f"SLURM tools still missing after apt-get install: {missing}" if missing else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_memory_mb() -> int:
    """What the node offers: 90% of the machine's memory, so slurmd's own check never finds less."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.9) // 2**20


def fake_gpu_files(root: Path, count: int) -> str | None:
    """`count` character devices that are /dev/null, as gres.conf's File= range; None where mknod is not allowed.

    slurmd counts a node's GPUs from the files gres.conf names, and wants devices: without any, it reports
    none, and slurmctld drains a node whose slurm.conf promises some."""
    folder = root / "gpus"
    folder.mkdir()
    null = os.stat("/dev/null").st_rdev
    try:
        for index in range(count):
            os.mknod(folder / f"gpu{index}", 0o600 | stat.S_IFCHR, null)
    except OSError:  # no CAP_MKNOD (some containers)
        return None
    return f"{folder}/gpu[0-{count - 1}]"


def slurm_conf(root: Path, node: str, memory_mb: int, munge_socket: Path, gpus: int = 0) -> str:
    """A one-node cluster: 2 CPUs as the consumable, `gpus` GPUs, no accounting, all state under `root`."""
    gres_types, node_gres = ("GresTypes=gpu\n", f" Gres=gpu:{gpus}") if gpus else ("", "")
    return f"""\
ClusterName=semvlptest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
MinJobAge=3600
{gres_types}NodeName={node} NodeAddr=127.0.0.1 CPUs=2 RealMemory={memory_mb}{node_gres} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def start_daemon(cluster: SlurmCluster, name: str, *args: str) -> None:
    """Start a daemon in the foreground (so its process is ours to stop), its output in log/."""
    out = open(cluster.root / "log" / f"{name}.out", "w")
    cluster.daemons.append(
        subprocess.Popen([find_tool(name), *args], stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **cluster.env})
    )
    out.close()  # the child holds its own descriptor


def stop_cluster(cluster: SlurmCluster) -> None:
    """Cancel leftover jobs, stop the daemons (newest first), unlink the default config path."""
    if any(daemon.poll() is None for daemon in cluster.daemons):
        try:  # a run that timed out leaves its jobs behind
            cluster.command("scancel", f"--user={pwd.getpwuid(os.getuid()).pw_name}")
            wait_for(cluster.queue_is_empty, 60)
        except subprocess.SubprocessError:
            pass  # slurmctld is not answering: stopping the daemons below is all that is left to do
    for daemon in reversed(cluster.daemons):
        daemon.terminate()
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    if DEFAULT_SLURM_CONF.is_symlink() and DEFAULT_SLURM_CONF.resolve() == cluster.conf.resolve():
        DEFAULT_SLURM_CONF.unlink()


@pytest.fixture
def slurm_cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    """munged, slurmctld and slurmd on this machine, one idle node with 2 CPUs; stopped afterwards."""
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs its daemons as root (SlurmUser=root); run the tests as root")
    if reason := install_slurm():
        pytest.skip(reason)
    if DEFAULT_SLURM_CONF.is_symlink() and not DEFAULT_SLURM_CONF.exists():
        DEFAULT_SLURM_CONF.unlink()  # left by an interrupted run of this test
    if os.path.lexists(DEFAULT_SLURM_CONF):
        pytest.skip(f"{DEFAULT_SLURM_CONF} exists: this machine has its own SLURM setup, which the test leaves alone")
    memory_mb = node_memory_mb()
    if memory_mb < LARGEST_JOB_MEM_MB:
        pytest.skip(f"the node would offer {memory_mb} MB, less than the {LARGEST_JOB_MEM_MB} MB a tiny-config job asks for")

    root = tmp_path_factory.mktemp("slurm")
    for folder in ("state", "spool", "log", "munge"):
        (root / folder).mkdir()
    (root / "munge").chmod(0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    munge_socket = root / "munge" / "munge.socket"
    node = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    gpus = 0
    if gpu_files := fake_gpu_files(root, NODE_GPUS):
        (root / "gres.conf").write_text(f"NodeName={node} Name=gpu File={gpu_files}\n")  # beside slurm.conf
        gpus = NODE_GPUS
    conf.write_text(slurm_conf(root, node, memory_mb, munge_socket, gpus))
    cluster = SlurmCluster(root=root, conf=conf, node=node, env={"SLURM_CONF": str(conf)}, gpus=gpus)
    DEFAULT_SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
    DEFAULT_SLURM_CONF.symlink_to(conf)
    try:
        start_daemon(
            cluster, "munged", "--foreground", "--force", f"--key-file={key}", f"--socket={munge_socket}",
            f"--pid-file={root}/munge/munged.pid", f"--seed-file={root}/munge/munged.seed",
            f"--log-file={root}/log/munged.log",
        )  # fmt: skip
        assert wait_for(munge_socket.exists, 30), "munged did not open its socket\n" + cluster.log_tails()
        start_daemon(cluster, "slurmctld", "-D", "-f", str(conf))
        start_daemon(cluster, "slurmd", "-D", "-f", str(conf), "-N", node)
        assert wait_for(cluster.node_is_idle, 120, 2), "the node never became idle in sinfo\n" + cluster.log_tails()
        yield cluster
    finally:
        stop_cluster(cluster)


@dataclass
class SubmittedJob:
    """One Snakemake job as the main process printed it, and the SLURM job it was submitted as."""

    rule: str
    threads: int
    resources: dict[str, str]
    slurm_id: str
    slurm_log: Path


def job_blocks(output: str) -> dict[str, tuple[str, int, dict[str, str]]]:
    """{Snakemake job id: (rule, threads, resources)} from the blocks Snakemake prints for its jobs."""
    blocks = {}
    for match in re.finditer(r"^rule (\w+):\n((?:    .*\n)+)", output, re.MULTILINE):
        fields = dict(re.findall(r"^    (\w+): (.*)$", match.group(2), re.MULTILINE))
        resources = dict(re.findall(r"(\w+)=([^,]+)", fields.get("resources", "")))
        blocks[fields["jobid"]] = (match.group(1), int(fields.get("threads", 1)), resources)
    return blocks


def submitted_jobs(output: str) -> dict[str, SubmittedJob]:
    """{Snakemake job id: job} from the main process's output: each job's block, then its submission."""
    blocks = job_blocks(output)
    jobs = {}
    for jobid, slurm_id, log in re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (.+)\)\.", output):
        rule, threads, resources = blocks[jobid]
        jobs[jobid] = SubmittedJob(rule, threads, resources, slurm_id, Path(log))  # a retry replaces the first try
    return jobs


def slurm_minutes(time_limit: str) -> int:
    """scontrol's [D-]HH:MM:SS as minutes."""
    days, _, clock = time_limit.rpartition("-")
    hours, minutes, seconds = (int(part) for part in clock.split(":"))
    return int(days or 0) * 1440 + hours * 60 + minutes + seconds // 60


def timed_snakemake(workdir: Path, *args: str, timeout: int, env: dict | None = None):
    start = time.perf_counter()
    result = run_snakemake(workdir, *args, timeout=timeout, env=env)
    return result, time.perf_counter() - start


@pytest.mark.slow
@pytest.mark.timeout(4200)
def test_tiny_workflow_runs_through_the_slurm_profile(slurm_cluster, tiny_run, tmp_path, capsys):
    local_seconds = tiny_run.seconds  # the same tiny workflow run locally (conftest)

    workdir = tmp_path / "slurm"
    # the target comes before --configfile, which takes every path after it
    result, slurm_seconds = timed_snakemake(
        workdir, "--profile", str(PROFILE), *TEST_CLUSTER_OPTIONS, "results/all.tsv", "--configfile", TINY,
        timeout=2700, env=slurm_cluster.env,
    )  # fmt: skip
    output = result.stdout + result.stderr
    slurm_logs = sorted((workdir / ".snakemake" / "slurm_logs").rglob("*.log"))
    context = (
        f"\n--- snakemake (exit {result.returncode}) ---\n{output[-8000:]}\n{slurm_cluster.log_tails()}\n"
        + "\n".join(f"--- {log} ---\n{log.read_text(errors='replace')[-1500:]}" for log in slurm_logs[-3:])
    )
    assert result.returncode == 0, "the SLURM run failed" + context

    table = pd.read_csv(workdir / "results" / "all.tsv", sep="\t")
    assert set(table.task) == TASKS and set(table.variant) == {"semvlp", "none"}, context

    # Every job of the DAG was submitted with sbatch, ran as a SLURM job and asked for its rule's resources.
    total = int(re.search(r"^total\s+(\d+)$", output, re.MULTILINE).group(1))
    jobs = submitted_jobs(output)
    assert len(jobs) == total, f"{len(jobs)} of {total} jobs were submitted to SLURM" + context
    assert {job.rule for job in jobs.values()} >= {"generate_world", "extract_regions", "pretrain_phase", "finetune", "report"}
    held = slurm_cluster.jobs()
    for job in jobs.values():
        record = held.get(job.slurm_id)
        assert record is not None, f"slurmctld does not know job {job.slurm_id} ({job.rule})" + context
        assert record["JobState"] == "COMPLETED", f"{job.rule}: {record}"
        assert record["JobName"].startswith("semvlp_"), record["JobName"]  # the profile's job-name prefix
        assert record["Comment"].startswith(f"rule_{job.rule}"), record["Comment"]
        assert record["MinMemoryNode"] == f"{job.resources['mem_mb']}M", (job.rule, record["MinMemoryNode"])
        assert slurm_minutes(record["TimeLimit"]) == int(job.resources["runtime"]), (job.rule, record["TimeLimit"])
        assert int(record["NumCPUs"]) == job.threads, (job.rule, record["NumCPUs"])
        assert "gpu" not in record["TRES"]  # the tiny config asks for gpu=0 everywhere
        # slurmstepd wrote the job's output: the Snakemake inside the job ran the rule
        assert f"(Rule: {job.rule})" in job.slurm_log.read_text(), job.slurm_log
    assert max(job.threads for job in jobs.values()) == 2  # pre-training asked for both CPUs

    # The jobs on the cluster logged to the run of the invocation that submitted them.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'results' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("semvlp-tiny").experiment_id], max_results=1000)
    parents = [run for run in runs if run.data.tags.get("semvlp.kind") == "invocation"]
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {run.data.tags["mlflow.parentRunId"] for run in children} == {parents[0].info.run_id}
    assert set(table.run_id) <= {run.info.run_id for run in children}

    with capsys.disabled():
        print(
            f"\ntiny workflow, {total} jobs: local --cores 4 {local_seconds:.0f} s, "
            f"SLURM profile on a one-node 2-CPU cluster {slurm_seconds:.0f} s "
            f"(ratio {slurm_seconds / local_seconds:.2f})"
        )


# The resources that decide a SLURM job's task and GPU layout, in the plugin's sbatch call and in the srun
# that starts the job step: the stand-in rule below takes them from the real rule's job.
LAYOUT_RESOURCES = (
    "gpu", "gpus", "gpu_model", "gres", "tasks", "tasks_per_gpu", "tasks_per_node", "nodes", "mpi", "cpus_per_gpu",
)  # fmt: skip
# What each launch of the stand-in job records: the job, its step, the step's tasks and GPUs.
LAUNCH_RECORD = """\
{ env | grep -E '^(SLURM_(JOB_ID|STEP_ID|NTASKS|STEP_NUM_TASKS|PROCID|GPUS|GPUS_ON_NODE|STEP_GPUS|JOB_GPUS)|CUDA_VISIBLE_DEVICES)=' \\
  | sort | tr '\\n' ' '; echo; } >> launches.txt
"""


def literal(value: str) -> int | str:
    return int(value) if re.fullmatch(r"-?\d+", value) else value


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_multi_gpu_job_is_one_task_launched_once(slurm_cluster, tmp_path, capsys):
    if slurm_cluster.gpus < NODE_GPUS:
        pytest.skip("the test cluster has no fake GPUs: making their device files (mknod) is not allowed here")
    # The real workflow with config/paper.yaml's per-rule resources on top of the tiny config (a dry run):
    # every job of a GPU rule asks for tasks_per_gpu=0 (rule_resources in workflow/rules/common.smk).
    paper = yaml.safe_load((REPO / "config" / "paper.yaml").read_text())
    assert paper["resources"]["pretrain_phase"]["gpu"] == NODE_GPUS
    paper_resources = tmp_path / "paper-resources.yaml"
    paper_resources.write_text(yaml.safe_dump({"resources": paper["resources"]}))
    dry = run_snakemake(
        tmp_path / "dry", "--profile", str(PROFILE), "--dry-run", "results/all.tsv",
        "--configfile", TINY, str(paper_resources), timeout=300,
    )  # fmt: skip
    assert dry.returncode == 0, dry.stdout[-4000:] + dry.stderr[-4000:]
    blocks = job_blocks(dry.stdout + dry.stderr)
    on_gpus = [(rule, resources) for rule, _, resources in blocks.values() if int(resources.get("gpu", 0))]
    assert {rule for rule, _ in on_gpus} == GPU_RULES
    for rule, _, resources in blocks.values():
        expected = "0" if rule in GPU_RULES else None
        assert resources.get("tasks_per_gpu") == expected, (rule, resources)
    phase = next(resources for rule, _, resources in blocks.values() if rule == "pretrain_phase")
    assert phase["gpu"] == str(NODE_GPUS), phase

    # A stand-in for that pre-training job, submitted through the profile: the same layout resources, the
    # CPUs and memory the node has, and a job that records each launch of itself instead of training.
    resources = {key: literal(phase[key]) for key in LAYOUT_RESOURCES if key in phase}
    resources.update(mem_mb=500, runtime=5, cpus_per_task=1)
    workdir = tmp_path / "gpu-job"
    workdir.mkdir()
    (workdir / "launch.sh").write_text(LAUNCH_RECORD)
    snakefile = workdir / "Snakefile"
    snakefile.write_text(
        "rule pretrain_phase:\n"
        '    output: "phase1.done"\n'
        "    threads: 1\n"
        f"    resources: **{resources!r}\n"
        '    shell: "sh launch.sh && touch {output}"\n'
    )
    cmd = [
        str(BIN / "snakemake"), "--snakefile", str(snakefile), "--directory", str(workdir),
        "--profile", str(PROFILE), *TEST_CLUSTER_OPTIONS, "--verbose", "phase1.done",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **slurm_cluster.env})
    output = result.stdout + result.stderr
    slurm_logs = sorted((workdir / ".snakemake" / "slurm_logs").rglob("*.log"))
    context = (
        f"\n--- snakemake (exit {result.returncode}) ---\n{output[-6000:]}\n{slurm_cluster.log_tails()}\n"
        + "\n".join(f"--- {log} ---\n{log.read_text(errors='replace')[-3000:]}" for log in slurm_logs)
    )
    assert result.returncode == 0, "the GPU job failed" + context

    # The sbatch call the plugin built: all the GPUs, and no task count (--ntasks-per-gpu or --ntasks), so
    # the job is sbatch's default of one task; its batch script runs once.
    calls = re.findall(r"sbatch call: (sbatch .*?) --wrap=", output)
    assert len(calls) == 1, calls
    options = calls[0].split()
    assert f"--gpus={NODE_GPUS}" in options, options
    assert not [option for option in options if option.startswith(("--ntasks", "-n"))], options
    (job,) = submitted_jobs(output).values()
    record = slurm_cluster.jobs()[job.slurm_id]
    assert record["JobState"] == "COMPLETED", f"{record}"
    assert record["NumTasks"] == "1", f"{record}"
    # the GPUs the job holds (TRES would list them only with gres/gpu in AccountingStorageTRES)
    assert re.fullmatch(rf"(gres[:/])?gpu:{NODE_GPUS}", record.get("TresPerJob", "")), f"{record}"

    # The batch script's Snakemake started the job step with one srun task that holds all the GPUs...
    slurm_log = job.slurm_log.read_text()
    step_calls = re.findall(r"The call for this job is: (srun .*?) -m snakemake ", slurm_log)
    assert len(step_calls) == 1, "no single job step call in the job's log" + context
    step_options = step_calls[0].split()[:-1]  # up to the Python that runs the job's Snakemake
    assert step_options[:2] == ["srun", "-n1"] and f"--gpus={NODE_GPUS}" in step_options, step_options
    # ...and the rule ran once, as the one task of that step, seeing all the (fake) GPUs.
    launches = (workdir / "launches.txt").read_text().splitlines()
    assert len(launches) == 1, f"the job ran {len(launches)} times: {launches}" + context
    launch = dict(item.split("=", 1) for item in launches[0].split())
    assert launch["SLURM_JOB_ID"] == job.slurm_id, launch
    assert launch["SLURM_STEP_NUM_TASKS"] == "1" and launch["SLURM_PROCID"] == "0", launch
    assert launch.get("SLURM_GPUS_ON_NODE") == str(NODE_GPUS), launch
    assert len(launch.get("CUDA_VISIBLE_DEVICES", "").split(",")) == NODE_GPUS, launch  # what torchrun sees

    with capsys.disabled():
        print(f"\ngpu: {NODE_GPUS} job, sbatch call: {calls[0]}")
        print(f"job step: {' '.join(step_options)}; launches: {len(launches)}: {launches[0].strip()}")
