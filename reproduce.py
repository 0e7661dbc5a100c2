"""A paper's table in one command: every run of a benchmark, shared out over as many processes as
you start, then the table. eval.py's --benchmark calls it (bench.py, by contrast, measures speed).

    python eval.py --benchmark toy                              # 25 runs on a laptop, one at a time
    torchrun --nproc_per_node 8 eval.py --benchmark base2novel  # 8 methods x 11 data sets x 3 seeds
    torchrun --nproc_per_node 8 eval.py --benchmark crossdataset --methods pmpo
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        eval.py --benchmark fewshot --seeds 1 2 3                   # four machines

Each run is an ordinary train.py run in its usual folder (runs/<dataset>/<method>/<protocol>/
shots<K>_seed<S>; toy: runs/toy_benchmark/<method>/...). Under torchrun every process walks the same
list of runs and takes the next one nobody holds: the run folder's lock (runfolder.lock_run_folder)
is the only coordination, so each run is done exactly once, by whichever process is free. A finished
run is skipped, an interrupted one resumes from its last epoch: kill the whole thing and start it
again (or let torchrun's --max-restarts do so) and nothing is done twice. Each process computes on
its own device, cuda:LOCAL_RANK (or the CPU). A run that fails, or a folder that cannot hold one,
is reported with its folder and the others go on; once no process holds a run any more (the locks
again: no collective, so a restarted round needs no rendezvous) the first process prints the table,
and its exit code is 1 if any run failed. Cross-dataset: the ImageNet runs first, then each target
evaluated with eval.py as soon as its ImageNet run has finished.
"""

import os
import sys
import time
import traceback
from collections import namedtuple
from contextlib import suppress

import clip
import console
import data
import options
import runfolder
import speed
import tables
import train

SEEDS = (1, 2, 3)  # the papers average seeds 1, 2 and 3
SHOTS = (1, 2, 4, 8, 16)  # few-shot learning: CoOp's K
# What the benchmark sets in each run: a flag after -- may not set it too (the benchmark's own
# option, or None where it has none)
OWNED = dict(method="--methods", dataset="--datasets", protocol="--benchmark", seed="--seeds",
             shots="--shots", out="--out", root="--root", device="--device", fewshot_file=None)
BENCHMARKS = (*options.PROTOCOLS, "toy")  # toy: the toy world's base-to-novel table

# kind: "train" (a train.py run into folder), "eval" (eval.py on folder's checkpoint, into out),
# "zeroshot" (the toy's zero-shot CLIP row, into folder)
Job = namedtuple("Job", "kind folder argv out")


def jobs(args, extra):
    """The benchmark's runs, in the order they are taken: every (method, data set, K, seed)."""
    if args.benchmark == "toy":
        out = toy_out(args)
        todo = [Job("zeroshot", os.path.join(out, "zeroshot", "base2novel", "shots16_seed1"), [],
                    None)]
        for method in args.methods:
            for seed in args.seeds:
                folder = os.path.join(out, method, "base2novel", f"shots16_seed{seed}")
                todo.append(Job("train", folder, ["--method", method, "--dataset", "toy",
                                                  "--seed", str(seed), *extra], None))
        return todo
    out = args.out or "runs"
    protocol = args.benchmark
    sources = ["imagenet"] if protocol == "crossdataset" else args.datasets
    shots = args.shots if protocol == "fewshot" else args.shots[:1]
    todo = []
    for dataset in sources:
        for method in args.methods:
            for k in shots:
                for seed in args.seeds:
                    folder = os.path.join(out, runfolder.safe_name(dataset), method, protocol,
                                          f"shots{k}_seed{seed}")
                    todo.append(Job("train", folder, [
                        "--method", method, "--dataset", dataset, "--protocol", protocol,
                        "--shots", str(k), "--seed", str(seed), *extra], None))
    if protocol == "crossdataset":  # then every target, on each ImageNet run's checkpoint
        todo += [Job("eval", job.folder, ["--dataset", target],
                     os.path.join(job.folder, f"eval_{runfolder.safe_name(target)}_all.json"))
                 for target in args.datasets for job in list(todo)]
    return todo


def done(job):
    return os.path.exists(job.out) if job.kind == "eval" else runfolder.finished(job.folder)


def run(args, extra, evaluate):
    """Do this process's share of the benchmark's runs; the first process prints the table. Returns
    the table (None on the other processes). evaluate: eval.py's main, for cross-dataset's
    evaluations (passed down, so that this module never imports the script above it)."""
    rank, world, local = (int(os.environ.get(k, d)) for k, d in
                          (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = f"cuda:{local}" if args.device == "cuda" and world > 1 else args.device
    if device == "cpu" and world > 1 and "--threads" not in extra and args.benchmark != "toy":
        share = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        extra = [*extra, "--threads", str(share)]  # the cores shared out, not each rank taking all
    todo = jobs(args, extra)
    check(args, todo, rank, device)
    start = time.time()
    if rank == 0:  # also shows, before any run, that stdout can be written
        say(f"{len(todo)} runs, {sum(map(done, todo))} finished before, {world} process(es)")
    failures = work(todo, args, device, rank, world, evaluate)
    if rank > 0:  # its failures were printed; the first process names every unfinished run
        return None
    # No collective: the other processes are waited for through their runs' locks, so a round
    # that torchrun restarts after a worker died needs no rendezvous, only the run folders
    failures += unfinished(todo, failures)
    grid = dict(methods=args.methods, datasets=args.datasets, seeds=args.seeds)
    if args.benchmark == "toy":
        grid.update(methods=["zeroshot", *args.methods], datasets=["toy"])
    table = tables.summary(sorted({job.folder for job in todo}), grid)
    say(f"\n{table}\n\n{len(todo)} runs, {world} process(es), {time.time() - start:.0f}s")
    for folder, message in failures:
        print(f"failed: {folder}: {message}", file=sys.stderr)
    if failures:
        raise SystemExit(1)
    return table


def say(text):
    """A line on stdout, flushed. A full disk or a closed pipe there stops the benchmark with one
    line, before any run (the first line) or after all (the table)."""
    try:  # one write per line: two processes' lines on one pipe never cut into each other
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except OSError as e:
        with suppress(OSError, ValueError):  # what stays buffered goes nowhere, not to a traceback
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(f"error: could not write to stdout: {e.strerror or e}. Make room (or send "
                         f"stdout elsewhere) and run the same command again: the runs saved are "
                         f"skipped, and the table is printed") from None


def toy_out(args):
    return args.out or os.path.join("runs", "toy_benchmark")


def check(args, todo, rank, device):
    """Before any run starts: every run's settings (a typo never runs something else), every data
    set present (one message for all), no folder of a user's in a run's place, and no folder made
    with another CLIP file than its run would use; a finished folder with other settings than its
    run's is named (its table shows it apart), never silently counted as this benchmark's."""
    configs = {tuple(job.argv): options.parse_args(job.argv + ["--root", args.root, "--device",
                                                               device])
               for job in todo if job.kind == "train"}
    read = {job.argv[job.argv.index("--dataset") + 1] for job in todo if job.kind != "zeroshot"}
    check_data(sorted(read | ({"toy"} if args.benchmark == "toy" else set())), args.root)
    models = {argv: cfg["model"] for argv, cfg in configs.items()}
    digests = {model: clip.clip.sha256(model) for model in {*models.values(), "toy"}}
    for job in todo:
        if job.kind != "eval":
            if not runfolder.finished(job.folder):  # to be written in: a user's folder is refused
                runfolder.check_ours(job.folder)
            model = models[tuple(job.argv)] if job.kind == "train" else "toy"
            check_same_clip(job.folder, model, digests[model])
        if job.kind == "train" and runfolder.finished(job.folder) and rank == 0:
            old = runfolder.read_config(os.path.join(job.folder, "config.json")) or {}
            new = options.recorded(configs[tuple(job.argv)])
            differ = [f"{k}: {a!r} -> {b!r}"
                      for k, (a, b) in options.differences(old, new).items()]
            if differ:
                print(f"note: {job.folder} holds a finished run with other settings than this "
                      f"benchmark's ({', '.join(differ[:3])}); its table shows it apart. Delete "
                      f"that folder to run it again.", file=sys.stderr)


def check_data(names, root):
    """Every data set the runs read, present under root; else one message naming each missing
    one and the command that fetches them, before any folder is made."""
    missing = {}
    for name in names:
        try:
            with console.clear_errors():
                data.build_dataset(name, root)
        except SystemExit as e:
            missing[name] = str(e.code).removeprefix("error: ").splitlines()[0].split(". ")[0]
    if missing:
        known = [name for name in missing if name in data.DATASETS]
        fetch = (f"`python -m data.prepare {' '.join(known)} --root {root}` downloads what it "
                 f"can and says where the rest goes; " if known else "")
        raise SystemExit(f"error: {len(missing)} data set(s) of this benchmark cannot be read "
                         f"under --root {root}: " + "; ".join(f"{n} ({why})" for n, why in
                                                              missing.items())
                         + f". {fetch}or pass --datasets without them. No run was started.")


def work(todo, args, device, rank, world, evaluate):
    """Take the next run nobody holds until none is left; returns [(folder,
    message)] of failures."""
    # spread the starts
    pending = todo[rank * len(todo) // world:] + todo[:rank * len(todo) // world]
    failures = []
    while pending:
        progressed = False
        for job in list(pending):
            if done(job):
                pending.remove(job)
                continue
            if job.kind == "eval" and not runfolder.finished(job.folder):
                if not held(job.folder) and job.folder not in running(pending):
                    pending.remove(job)  # its ImageNet run failed (reported where it ran)
                continue  # its ImageNet run is still going: wait
            try:  # a folder that cannot be locked (a file in its place, say) fails like a run
                if not claim(job):
                    pending.remove(job)  # another process has it
                    continue
                try:
                    if world > 1:
                        say(f"rank {rank} ({device}): {job.kind} {job.out or job.folder}")
                    perform(job, args, device, evaluate)
                finally:
                    release(job)
            except (Exception, SystemExit) as e:  # one failed run: report it, go on with the others
                message = (str(e).removeprefix("error: ") if isinstance(e, SystemExit) else
                           traceback.format_exc(limit=3))
                print(f"error: rank {rank}: the run in {job.folder} failed: {message}",
                      file=sys.stderr, flush=True)
                failures.append((job.folder, str(e).removeprefix("error: ") or type(e).__name__))
            pending.remove(job)
            progressed = True
        if pending and not progressed:
            time.sleep(2)  # only evaluations left, waiting for ImageNet runs on other processes
    return failures


def unfinished(todo, failures):
    """Runs neither done nor failed here: another process (say, a worker of an earlier start that
    outlived its launcher) holds them. Wait for it; what it leaves unfinished is a failure."""
    failed = {folder for folder, _ in failures}
    waiting = [job for job in todo if not done(job) and job.folder not in failed]
    while any(held_job(job) for job in waiting if not done(job)):
        time.sleep(2)
    return [(job.folder, "not finished: the process that ran it failed (its error is above) or "
                         "was stopped")
            for job in waiting if not done(job)]


def held_job(job):
    return held_lock(job.out + ".lock") if job.kind == "eval" else held(job.folder)


def running(pending):
    return {job.folder for job in pending if job.kind == "train"}


def claim(job):
    """This process's lock on the job (a run's folder lock, or an evaluation's own), or False if
    another process has it. A folder where no lock can be taken raises SystemExit saying why."""
    folder = os.path.dirname(job.out) if job.kind == "eval" else job.folder
    why = runfolder.unwritable(folder)  # a file in the folder's place, a read-only folder
    if why:
        raise SystemExit(f"error: {why}: fix or remove it, or pass another --out")
    try:
        if job.kind == "eval":
            with console.write_errors(folder):
                os.makedirs(folder, exist_ok=True)
                if not runfolder.try_lock(job.out + ".lock"):
                    return False
        else:
            runfolder.make_run_folder(job.folder)  # marked before locked: check() saw it is ours
            runfolder.lock_run_folder(job.folder)
    except SystemExit:  # another process holds the lock, or it cannot be taken: the message says
        if held_job(job) or done(job):
            return False
        raise
    if done(job):  # finished between the look and the lock
        release(job)
        return False
    return True


def release(job):
    if job.kind == "eval":
        runfolder.unlock(job.out + ".lock")
    else:
        runfolder.unlock_run_folder(job.folder)


def held(folder):
    """Whether some process holds the run folder's lock now (a held lock has its file: no .lock
    is made where there is none)."""
    lock = os.path.join(folder, ".lock")
    return os.path.isfile(lock) and held_lock(lock)


def held_lock(path):
    """Whether some process holds the lock file at path; False where none can be (no such folder,
    the lock a folder or unreadable: claim names what is wrong)."""
    try:
        if not runfolder.try_lock(path):
            return True
    except OSError:
        return False
    runfolder.unlock(path, remove=False)
    return False


def perform(job, args, device, evaluate):
    if job.kind == "zeroshot":
        return zeroshot_run(job.folder, args, device)
    common = ["--root", args.root, "--device", device]
    if job.kind == "train":
        return train.main(job.argv + common + ["--out", job.folder])
    return evaluate(["--ckpt", os.path.join(job.folder, "prompt_learner.pt"), *job.argv,
                         *common, "--out", job.out])


def check_same_clip(folder, model, sha256):
    """Refuse a folder holding a run of another CLIP file (or of one not recorded)."""
    try:
        cfg = runfolder.read_config(os.path.join(folder, "config.json"))
    except ValueError as e:
        raise SystemExit(f"error: {e}: so {folder} is not this benchmark's run. Delete that "
                         f"folder (or pass another --out) to run it again.") from None
    if cfg is None or cfg.get("clip_sha256") == sha256:
        return  # nothing there yet (or damaged: train.py's own checks name it)
    raise SystemExit(f"error: {folder} was made with another CLIP (sha256 "
                     f"{cfg.get('clip_sha256') or 'not recorded'}; {model} is {sha256}), so its "
                     f"result is not this benchmark's. Delete that folder (or pass another --out) "
                     f"to run it again.")


def zeroshot_run(folder, args, device):
    """Zero-shot CLIP as a base-to-novel run folder (config.json, metrics.json):
    the table's first row."""
    cfg = dict(vars(args), method="zeroshot", dataset="toy", protocol="base2novel", shots=16,
               seed=1, model="toy", clip_sha256=clip.clip.sha256("toy"), device=device)
    ds = train.read_dataset("toy", args.root)
    clip_model = speed.keep_in_precision(train.load_frozen_clip("toy", device), cfg)
    metrics = train.zeroshot_metrics(clip_model, ds, cfg)
    print("zeroshot on toy: " + "  ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    recorded = ("method", "dataset", "protocol", "shots", "seed", "model", "clip_sha256",
                "eval_batch_size", "workers")
    runfolder.save_json(os.path.join(folder, "config.json"), {k: cfg[k] for k in recorded})
    runfolder.save_json(os.path.join(folder, "metrics.json"), metrics)  # last: the row is done


def default_datasets(protocol):
    """--datasets' default: the protocol's list (cross-dataset: the targets)."""
    return {"crossdataset": tables.ELEVEN[1:] + tables.SHIFTS, "toy": ("toy",)}.get(protocol,
                                                                                   tables.ELEVEN)


def check_datasets(names):
    for name in names:
        if name not in data.DATASETS and not name.startswith("folder:"):
            raise SystemExit(f"error: unknown data set {name!r} in --datasets; known: "
                             f"{', '.join(data.DATASETS)}, or folder:/path")
