"""Whether an SM's finish time is a property of the SM: from per-block timeline files (one line
per block: block, SM, entry, first tile landed, last tile landed, done; us), each SM's mean
time to its last tile relative to the launch's median, then the correlation of that per-SM
profile between every pair of files, and the SMs that finish earliest in the first file.
  python3 bench/decode_attention/sm_finish_correlation.py \
      bench/decode_attention/results/dyn_tail_experiment/timeline/tl_*.txt
"""
import itertools
import statistics
import sys


def per_sm_profile(path):
    by_sm = {}
    with open(path) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[0].isdigit():
                by_sm.setdefault(int(fields[1]), []).append(float(fields[4]))
    median = statistics.median(x for xs in by_sm.values() for x in xs)
    return {sm: statistics.mean(xs) / median for sm, xs in by_sm.items()}


def correlation(a, b):
    sms = sorted(set(a) & set(b))
    x, y = [a[s] for s in sms], [b[s] for s in sms]
    mx, my = statistics.mean(x), statistics.mean(y)
    num = sum((p - mx) * (q - my) for p, q in zip(x, y))
    den = (sum((p - mx) ** 2 for p in x) * sum((q - my) ** 2 for q in y)) ** 0.5
    return num / den


def main(paths):
    profiles = {p: per_sm_profile(p) for p in paths}
    for a, b in itertools.combinations(paths, 2):
        print(f"{a.split('/')[-1]:22} {b.split('/')[-1]:22} {correlation(profiles[a], profiles[b]):.2f}")
    first = profiles[paths[0]]
    early = sorted(sm for sm, r in first.items() if r < 0.95)
    print(f"{paths[0].split('/')[-1]}: {len(early)} SMs finish before 0.95 of the median: {early}")


if __name__ == "__main__":
    main(sys.argv[1:])
