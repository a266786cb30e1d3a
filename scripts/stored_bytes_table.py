"""Stored vs buffer bytes per user of every method at ML-100K shapes (2 layers, 1 head,
T = 200, head dim 50, float32), from shapes only (no training): the BENCHMARKS.md table.

  PYTHONPATH=$PWD python scripts/stored_bytes_table.py
"""

from malloc_jax import compressors as C

SPEC = C.cache_spec(2, 1, 200, 50)
METHODS = ["h2o", "merge_evicted", "snapkv", "streaming", "random", "lowrank", "intactkv",
           "uniform"]


def main():
  native = C.memory_bytes("native", SPEC)
  rows = [("native", "native", {})]
  for m in METHODS:
    for r, p in C.ratio_table(m, SPEC, (2, 4, 8, 16)).items():
      rows.append((f"{m} {r}x", m, p))
  rows += [(f"kivi {b}-bit", "kivi", dict(bits=b, group=25, residual=25)) for b in (4, 2)]
  print("| method | params | stored B/user | buffer B/user | ratio (stored) | ratio (buffer) |")
  print("|---|---|---|---|---|---|")
  for label, m, p in rows:
    if p is None:
      print(f"| {label} | out of reach | | | | |")
      continue
    s, b = C.memory_bytes(m, SPEC, **p), C.memory_bytes(m, SPEC, "buffer", **p)
    print(f"| {label} | {p} | {s:,.0f} | {b:,.0f} | {native / s:.2f}x | {native / b:.2f}x |")


if __name__ == "__main__":
  main()
