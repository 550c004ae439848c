"""Where a kernel's instructions and stall samples go, from ncu's source page (SASS, CSV):
  ncu -i REPORT --page source --csv --print-source sass > source.csv   (profile_core.sh does it)
  python3 bench/linear_attention/sass_hotspots.py source.csv [KERNEL_INDEX]
Prints, per kernel (or the one at KERNEL_INDEX), the share of executed warp instructions and of
stall samples by opcode, the top stall reasons, and by straight-line region (cut at barriers or
every 250 instructions) with each region's most executed opcodes, to tell the phases of a loop
body apart (address arithmetic, elementwise transforms, matrix work, epilogue).
"""
import collections
import csv
import sys


def num(x):
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return 0.0


def kernels(path):
    blocks, header = [], None
    with open(path) as f:
        for row in csv.reader(f):
            if not row:
                continue
            if row[0] == "Kernel Name":
                blocks.append((row[1], []))
                header = None
            elif row[0] == "Address":
                header = row
            elif header and blocks:
                blocks[-1][1].append(dict(zip(header, row)))
    return blocks


def opcode(sass):
    tokens = [t for t in sass.split() if not t.startswith("@")]
    return tokens[0].split(".")[0] if tokens else "?"


def report(name, ins):
    executed = [num(i["Instructions Executed"]) for i in ins]
    samples = [num(i["Warp Stall Sampling (All Samples)"]) for i in ins]
    te, ts = sum(executed) or 1.0, sum(samples) or 1.0
    print(f"== {name[:140]}\n   {len(ins)} SASS instructions, {te:.3g} warp instructions executed")
    by_e, by_s = collections.Counter(), collections.Counter()
    for i, e, s in zip(ins, executed, samples):
        by_e[opcode(i["Source"])] += e
        by_s[opcode(i["Source"])] += s
    print("   opcodes: " + ", ".join(f"{k} {100 * v / te:.1f}%/{100 * by_s[k] / ts:.1f}%"
                                     for k, v in by_e.most_common(12)) + " (executed/samples)")
    stalls = {k: sum(num(i[k]) for i in ins) for k in ins[0] if k.startswith("stall_")
              and "Not Issued" not in k}
    top = sorted(stalls.items(), key=lambda kv: -kv[1])[:6]
    print("   stalls: " + ", ".join(f"{k[6:]} {100 * v / ts:.1f}%" for k, v in top))
    start, ops, ce, cs = 0, collections.Counter(), 0.0, 0.0
    for n, (i, e, s) in enumerate(zip(ins, executed, samples)):
        op = opcode(i["Source"])
        ops[op] += e
        ce, cs = ce + e, cs + s
        if op == "BAR" or n - start >= 249 or n == len(ins) - 1:
            if ce / te > 0.005 or cs / ts > 0.005:
                top_ops = " ".join(f"{k}:{100 * v / te:.1f}" for k, v in ops.most_common(6))
                print(f"   {start:5d}-{n:5d} executed {100 * ce / te:5.1f}% samples "
                      f"{100 * cs / ts:5.1f}%  {top_ops}")
            start, ops, ce, cs = n + 1, collections.Counter(), 0.0, 0.0


def main():
    blocks = kernels(sys.argv[1])
    seen = set()
    for index, (name, ins) in enumerate(blocks):
        if len(sys.argv) > 2 and index != int(sys.argv[2]):
            continue
        if name in seen or not ins:  # the source page lists a kernel once per profiled launch
            continue
        seen.add(name)
        report(name, ins)


if __name__ == "__main__":
    main()
