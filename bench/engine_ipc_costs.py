"""What the pipeline process adds per event, in one process: the pickling of a batch's request and
reply (protocol 5), the output records, ``summarise_batch`` and ``DurableState.done``, against
``process_raw``; shuttle events in 1,024-event batches, CPU microseconds per event.

    python bench/engine_ipc_costs.py
"""
import sys, os, time, pickle
sys.path.insert(0, os.getcwd())
from streams.runtime import configure_threads; configure_threads(1)
from pathlib import Path
from streams.bench_speed import load_tabular, tabular_lines, make_pipeline
from streams.config import Settings
from streams.app import Worker
from streams.metrics import summarise_batch
from streams.engine_process import _Messages
X, _ = load_tabular(Path("/work/shared/data"), "32_shuttle", limit=40000)
lines = tabular_lines(X, kind="transaction", prefix="k")
w = Worker(settings=Settings())
w.pipeline = make_pipeline(); w.durable.pipeline = w.pipeline
B = 1024
batches = [lines[i:i+B] for i in range(0, len(lines), B)]
tp = ("t", 0)
acc = dict(process_raw=0., outputs=0., summarise=0., pickle_req=0., unpickle_req=0., pickle_rep=0., unpickle_rep=0., done=0.)
n = 0
for bi, raws in enumerate(batches):
    offsets = list(range(bi*B, bi*B+len(raws))); keys = [b"tab"]*len(raws); times = [time.time()]*len(raws)
    t = time.process_time(); blob = pickle.dumps((1, "process", (raws, [(tp, len(raws))], offsets, keys, times)), protocol=5); acc["pickle_req"] += time.process_time()-t
    t = time.process_time(); req = pickle.loads(blob); acc["unpickle_req"] += time.process_time()-t
    tps = [tp]*len(raws)
    t = time.process_time(); r = w.pipeline.process_raw(raws); acc["process_raw"] += time.process_time()-t
    t = time.process_time(); outs = w._outputs(r, _Messages(raws, tps, offsets, keys)); acc["outputs"] += time.process_time()-t
    t = time.process_time(); s = summarise_batch(r, w.pipeline, times); acc["summarise"] += time.process_time()-t
    t = time.process_time(); rb = pickle.dumps((1, True, (1, outs, s), []), protocol=5); acc["pickle_rep"] += time.process_time()-t
    t = time.process_time(); pickle.loads(rb); acc["unpickle_rep"] += time.process_time()-t
    w.durable.begin()
    t = time.process_time(); w.durable.done(tps, offsets, r, raws); acc["done"] += time.process_time()-t
    n += len(raws)
print({k: round(v/n*1e6, 2) for k, v in acc.items()}, "blob KB", len(blob)//1024, len(rb)//1024)
