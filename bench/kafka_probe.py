"""Where the Kafka path's time goes: saturation of `nwatch run` (aiokafka input and output) on the
embedded broker, with CPU microseconds per event of each of the worker's threads (pipeline thread,
event loop), CPU seconds per 1,000 events of worker, broker and this process, and the in-process
pipeline on the same events first.

    python bench/kafka_probe.py worker bare          # worker, then a bare aiokafka loop
    python bench/kafka_probe.py spy:/tmp/profile.txt  # worker under py-spy record (py-spy in .venv)

K4_OUTPUT (default aiokafka, as the worker) is the worker's kafka.output_path ("process": its producer process's CPU
shows in the worker's CPU seconds, not among its threads). K4_PIPELINE (default thread; the worker's default is auto: process) is its kafka.pipeline_path
("process": the pipeline process's threads are listed too, as child:<tid>, and its CPU per event as cpu_us_per_event.child). K4_EVENTS (default 30000) shuttle events, K4_REPEAT times over with fresh ids (default 1: a longer
measuring window at 2); K4_SPY_SECONDS (default 3) of py-spy, every thread, idle ones too; NWATCH_*
settings pass through to the worker.
"""
import asyncio, os, sys, time, subprocess, tempfile, json
from pathlib import Path
sys.path.insert(0, os.getcwd())
from streams.runtime import configure_threads; configure_threads(1)
from streams import bench_kafka as bk
from streams.bench_kafka import cpu_seconds as cpu
from streams.bench_speed import WARMUP, load_tabular

def tasks(pid):
    # the worker's threads, and its child processes' as child:<tid>
    out = [(t, f"/proc/{pid}/task/{t}") for t in os.listdir(f"/proc/{pid}/task")]
    for c in bk.child_pids(pid):
        try:
            out += [(f"child:{t}", f"/proc/{c}/task/{t}") for t in os.listdir(f"/proc/{c}/task")]
        except OSError:
            pass
    return out

def threads_cpu(pid):
    out = {}
    for t, path in tasks(pid):
        try:
            with open(f"{path}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            out[t] = (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
        except Exception:
            pass
    return out

def threads_runqueue(pid):
    # seconds each thread spent runnable but waiting for a core (/proc schedstat, field 2)
    out = {}
    for t, path in tasks(pid):
        try:
            with open(f"{path}/schedstat") as f:
                out[t] = int(f.read().split()[1]) / 1e9
        except Exception:
            pass
    return out

async def sat(bootstrap, lines, broker_pid, bare=False, spy=None):
    log_dir = Path(tempfile.mkdtemp(prefix="k4-"))
    run = bk._Run(bootstrap, ("bare", "bare") if bare else ("aiokafka", os.environ.get("K4_OUTPUT", "aiokafka"), os.environ.get("K4_PIPELINE", "thread")), log_dir)
    p = await bk._producer(bootstrap, linger_ms=20)
    futs = [await p.send(run.topics["events"], l, key=b"tab") for l in lines]
    await asyncio.gather(*futs); await p.stop()
    consumer = await bk._reader(bootstrap, run.topics["scores"])
    seen = {}
    run.start()  # its own session: stopping it stops its group only
    # wait for first results, then measure cpu over the window
    await bk._read_until(consumer, WARMUP, 120, seen, run.proc)
    th0, rq0 = threads_cpu(run.proc.pid), threads_runqueue(run.proc.pid)
    c0 = (bk.tree_cpu_seconds(run.proc.pid), cpu(broker_pid), time.process_time(), len(seen), time.time())
    spyp = None
    if spy:
        spyp = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "-p", str(run.proc.pid), "-d", os.environ.get("K4_SPY_SECONDS", "3"), *os.environ.get("K4_SPY_FLAGS", "--threads --idle").split(), "-f", "raw", "-o", spy, "-r", "250"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    await bk._read_until(consumer, len(lines), 300, seen, run.proc)
    th1, rq1 = threads_cpu(run.proc.pid), threads_runqueue(run.proc.pid)
    c1 = (bk.tree_cpu_seconds(run.proc.pid), cpu(broker_pid), time.process_time(), len(seen), time.time())
    if spyp: spyp.wait()
    run.stop(); await consumer.stop()
    n = c1[3] - c0[3]
    stamps = [ts for _, ts in seen.values()]
    rate = bk.saturation_rate(stamps, skip=WARMUP)
    thr = sorted(((round((th1[t] - th0.get(t, 0)) / (c1[3]-c0[3]) * 1e6, 1), t) for t in th1), reverse=True)[:6]
    rq = [round((rq1.get(t, 0) - rq0.get(t, 0)) / (c1[3]-c0[3]) * 1e6, 1) for _, t in thr]
    per_event = lambda pred: round(sum(th1[t] - th0.get(t, 0) for t in th1 if pred(t)) / n * 1e6, 1)
    return {"threads_us_per_event": thr, "cpu_us_per_event": {"worker": per_event(lambda t: not t.startswith("child:")), "child": per_event(lambda t: t.startswith("child:"))}, "runqueue_us_per_event": rq, "log": str(run.log_path), "bare": bare, "rate": round(rate), "wall": round(c1[4]-c0[4], 2), "events": n,
            "cpu_s_per_1000": {"worker": round((c1[0]-c0[0])/n*1000, 4), "broker": round((c1[1]-c0[1])/n*1000, 4), "bench": round((c1[2]-c0[2])/n*1000, 4)}}

def main():
    from streams.broker import EmbeddedBroker
    events = int(os.environ.get("K4_EVENTS", "30000"))
    X, _ = load_tabular(Path("/work/shared/data"), "32_shuttle", limit=events)
    lines = bk.shuttle_lines(X, int(os.environ.get("K4_REPEAT", "1")))
    modes = sys.argv[1:] or ["worker"]
    from streams.bench_speed import run_pipeline, make_pipeline
    c0 = time.process_time(); n, secs, _ = run_pipeline(make_pipeline(), lines); c1 = time.process_time()
    print(json.dumps({"in_process": round(n / secs), "cpu_s_per_1000": round((c1 - c0) / n * 1000, 4)}), flush=True)
    with EmbeddedBroker() as b:
        bpid = b._proc.pid
        for m in modes:
            r = asyncio.run(sat(b.bootstrap_servers, lines, bpid, bare=(m == "bare"), spy=(None if not m.startswith("spy") else m.split(":",1)[1])))
            print(json.dumps(r), flush=True)

main()
