"""Plots for docs/quality-analysis.md from the output of scripts/analyze_quality.py (CPU, matplotlib only).

    python scripts/plot_quality_analysis.py [/path/to/analysis.pt] [out_dir]

Defaults: /tmp/analysis.pt and docs/quality/. Writes PNGs and prints the FLOPs/v-loss table as markdown.
The FLOPs formula is the one of scripts/analyze_quality.py (copied, so this script needs no GPU or package import).
"""
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from quality_flops import flops  # noqa: E402

PT = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/analysis.pt")
OUT = Path(sys.argv[2] if len(sys.argv) > 2 else "docs/quality")
OUT.mkdir(parents=True, exist_ok=True)
S = torch.load(PT, weights_only=False)
LAYERS = range(6)
MAIN = (32, 32, 3)
CFGS = [(32, 32, 3), (32, 32, 2), (64, 64, 1), (64, 64, 2), (32, 32, 1), (16, 16, 6), (16, 16, 3)]
KINDS = ["sparse", "exacttail_alphahead", "linear_alphahead", "linear_exactmix", "pooled_exactmix",
         "pooled_alphahead", "pooled_lse", "pooledblk_lse", "pooled_lselin", "oracle_linear_alphahead",
         "oracle_pooled_lse"]
COLORS = dict(zip(KINDS, plt.get_cmap("tab20").colors[::2] + plt.get_cmap("tab20").colors[1::2]))
plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "figure.dpi": 110})


def cfg_name(c):
    return f"{c[0]}/{c[1]} keep {c[2]}"


def save(fig, name):
    fig.savefig(OUT / name, bbox_inches="tight")
    plt.close(fig)
    print("wrote", OUT / name)


# 1. where the error comes from: layer-local per layer, and the whole model, at 32/32 keep 3
dec = ["sparse", "exacttail_alphahead", "linear_exactmix", "linear_alphahead", "pooled_exactmix",
       "pooled_alphahead", "pooled_lse", "oracle_pooled_lse"]
fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [2.2, 1]})
w = 0.8 / len(dec)
for j, kind in enumerate(dec):
    e = S["layer_local"][MAIN + (kind,)]
    a.bar(np.arange(6) + (j - len(dec) / 2 + 0.5) * w, e, w, label=kind, color=COLORS[kind])
a.set_yscale("log")
a.set_ylim(5e-4, 0.8)
a.set_xticks(range(6), [f"layer {i}" for i in LAYERS])
a.set_ylabel("layer-local rel. sq. error ‖O−O_dense‖²/‖O_dense‖²")
a.set_title(f"(a) layer-local error per layer, {cfg_name(MAIN)}")
a.grid(axis="y", which="both", alpha=0.3)
a.legend(fontsize=8, ncol=2, loc="upper left")
r = [S["model"][MAIN + (k,)] for k in dec]
b.barh(range(len(dec)), r, color=[COLORS[k] for k in dec])
for i, v in enumerate(r):
    b.text(v + 0.01, i, f"{v:.3f}", va="center", fontsize=8)
b.set_yticks(range(len(dec)), dec, fontsize=8)
b.invert_yaxis()
b.axvline(1.05, color="k", ls=":", lw=1)
b.text(1.05, len(dec) - 0.4, " 1.05 target", fontsize=8)
b.set_xlim(1.0, max(r) * 1.08)
b.set_xlabel("held-out v-loss / dense (all 6 layers)")
b.set_title("(b) whole model")
save(fig, "error_sources.png")

# 2. error vs noise level t (quantile bins), per layer
t = S["t"].numpy()
edges = np.quantile(t, np.linspace(0, 1, 6))
bins = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, 4)
centers = np.array([np.median(t[bins == i]) for i in range(5)])
fig, axes = plt.subplots(2, 3, figsize=(12, 6.4), sharex=True)
for i, ax in zip(LAYERS, axes.flat):
    for kind, style in (("sparse", dict(color="0.6", ls="--", lw=1)),
                        ("exacttail_alphahead", dict(color=COLORS["exacttail_alphahead"], ls=":", marker=".")),
                        ("linear_alphahead", dict(color=COLORS["linear_alphahead"], marker="o")),
                        ("pooled_lse", dict(color=COLORS["pooled_lse"], marker="s"))):
        e = S["per_t"][MAIN + (kind, i)].numpy()
        ax.plot(centers, [e[bins == j].mean() for j in range(5)], label=kind, **style)
    ax.set_yscale("log")
    ax.set_title(f"layer {i}")
    ax.grid(which="both", alpha=0.3)
for ax in axes[1]:
    ax.set_xlabel("noise level t (bin median; t=1 clean)")
for ax in axes[:, 0]:
    ax.set_ylabel("layer-local rel. sq. error")
axes[0, 0].legend(fontsize=8)
fig.suptitle(f"Layer-local error vs t, {cfg_name(MAIN)}; 5 quantile bins of the 128 samples "
             f"(edges {', '.join(f'{x:.2f}' for x in edges)})", fontsize=10)
fig.tight_layout()
save(fig, "error_vs_t.png")

# 3. captured mass over the image grid, layers 2 and 5, per head
fig, axes = plt.subplots(2, 3, figsize=(11, 7.6))
for row, i in enumerate((2, 5)):
    m = S["mass"][MAIN + (i,)]
    for h in range(3):
        ax = axes[row, h]
        im = ax.imshow(m[h, :1024].view(32, 32).numpy(), vmin=0.2, vmax=0.8, cmap="viridis")
        ctx = m[h, 1024:].mean().item() if m.shape[1] > 1024 else float("nan")
        ax.set_title(f"layer {i} head {h}\nmean: image {m[h, :1024].mean():.2f}, in-context {ctx:.2f}", fontsize=9)
        ax.set_xticks([0, 8, 16, 24, 31])
        ax.set_yticks([0, 8, 16, 24, 31])
        if h == 0:
            ax.set_ylabel("patch row = query block (32 tokens)")
        if row == 1:
            ax.set_xlabel("patch column")
fig.colorbar(im, ax=axes, shrink=0.8, extend="both",
             label="softmax mass in the router's 3 kept key blocks (mean of 128 samples)")
fig.suptitle(f"Captured mass per query token on the 32×32 patch grid, {cfg_name(MAIN)}", fontsize=11)
save(fig, "mass_grid_L2_L5.png")

# 4. captured mass per layer and head (distribution over query tokens), and per config
fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [1.6, 1]})
data, labels, pos = [], [], []
for i in LAYERS:
    m = S["mass"][MAIN + (i,)]
    for h in range(3):
        data.append(m[h, :1024].numpy())
        labels.append(f"L{i}h{h}")
        pos.append(i * 4 + h)
bp = a.boxplot(data, positions=pos, widths=0.7, whis=(1, 99), showfliers=False, patch_artist=True)
for patch, p in zip(bp["boxes"], pos):
    patch.set_facecolor(plt.get_cmap("tab10")(p // 4))
    patch.set_alpha(0.6)
for i in range(2, 6):
    m = S["mass"][MAIN + (i,)]
    a.scatter([i * 4 + h for h in range(3)], m[:, 1024:].mean(1).numpy(), marker="x", color="k", zorder=3,
              label="in-context tokens (mean)" if i == 2 else None)
a.axhline(0.85, color="r", ls=":", lw=1, label="85%")
a.set_xticks(pos, labels, rotation=90, fontsize=8)
a.set_ylim(0, 1)
a.set_ylabel("captured mass per image query token")
a.set_title(f"(a) per head, {cfg_name(MAIN)} (box 25-75%, whiskers 1-99%)")
a.legend(fontsize=8, loc="lower left")
for c, mk in zip(CFGS, "osv^D<>"):
    b.plot(LAYERS, [S["mass"][c + (i,)].mean().item() for i in LAYERS], marker=mk,
           label=f"{cfg_name(c)} ({c[2] * c[1]} keys kept)")
b.axhline(0.85, color="r", ls=":", lw=1)
b.set_ylim(0, 1)
b.set_xlabel("layer")
b.set_ylabel("mean captured mass (all query tokens)")
b.set_title("(b) per layer and block configuration")
b.legend(fontsize=7.5, loc="lower left")
b.grid(alpha=0.3)
save(fig, "mass_per_head.png")

# 5. single-layer sensitivity: v-loss ratio with only layer i converted vs its layer-local error
fig, ax = plt.subplots(figsize=(6.8, 5))
for kind, mk in (("linear_alphahead", "o"), ("pooled_lse", "s")):
    x = [S["layer_local"][MAIN + (kind,)][i] for i in LAYERS]
    y = [S["model"][("single", kind, i)] - 1 for i in LAYERS]
    ax.scatter(x, y, marker=mk, s=50, color=COLORS[kind], label=kind)
    offs = {("pooled_lse", 1): (-16, -13), ("pooled_lse", 4): (-16, 5), ("pooled_lse", 0): (4, 5),
            ("linear_alphahead", 0): (5, -10)}
    for i in LAYERS:
        ax.annotate(f"L{i}", (x[i], y[i]), textcoords="offset points", xytext=offs.get((kind, i), (5, 3)),
                    fontsize=9, color=COLORS[kind])
xs = np.linspace(0, 0.065, 10)
for slope in (1, 2, 4):
    ax.plot(xs, slope * xs, color="0.7", lw=0.8, ls="--")
    xl = min(0.063, 0.155 / slope)
    ax.text(xl, slope * xl, f"slope {slope}", fontsize=8, color="0.4", va="bottom", ha="right")
ax.set_xlabel("layer-local rel. sq. error (stage 1's objective)")
ax.set_ylabel("v-loss ratio − 1, only this layer converted")
ax.set_title(f"Single-layer sensitivity, {cfg_name(MAIN)}")
ax.set_xlim(0, 0.066)
ax.set_ylim(0, 0.16)
ax.grid(alpha=0.3)
ax.legend(fontsize=9, loc="upper left")
save(fig, "sensitivity.png")

# 6. FLOPs fraction vs model v-loss ratio, every config and variant (exact-tail rows cost > dense: left out)
fig, ax = plt.subplots(figsize=(10, 6))
markers = dict(zip(CFGS, "osv^D<>"))
for kind in KINDS:
    if kind == "exacttail_alphahead":
        continue
    for c in CFGS:
        ax.scatter(flops(kind, 1024, 64, *c), S["model"][c + (kind,)], marker=markers[c], color=COLORS[kind],
                   s=42, edgecolor="k", lw=0.3)
for kind in KINDS:
    if kind != "exacttail_alphahead":
        ax.scatter([], [], marker="o", color=COLORS[kind], label=kind)
for c in CFGS:
    ax.scatter([], [], marker=markers[c], color="w", edgecolor="k", label=cfg_name(c))
ax.axvline(0.10, color="r", ls=":", lw=1)
ax.text(0.101, 3.2, "90% of dense\nFLOPs removed", color="r", fontsize=8, va="top")
ax.axhline(1.05, color="k", ls=":", lw=1)
ax.text(0.2, 1.06, "1.05 target", fontsize=8, ha="right")
ax.set_yscale("log")
ax.set_yticks([1, 1.1, 1.2, 1.3, 1.5, 2, 3], ["1.0", "1.1", "1.2", "1.3", "1.5", "2", "3"])
ax.set_xlabel("attention FLOPs / dense (formula of analyze_quality.py, N=1024, D=64)")
ax.set_ylabel("held-out v-loss / dense (all 6 layers)")
ax.set_title("Cost vs quality, training-free (no weight adaptation)")
ax.grid(which="both", alpha=0.3)
ax.legend(fontsize=7.5, ncol=2, loc="upper right")
save(fig, "flops_vs_vloss.png")

# 7. router vs oracle top-k, model level
fig, ax = plt.subplots(figsize=(10, 4.2))
pairs = [("linear_alphahead", "oracle_linear_alphahead"), ("pooled_lse", "oracle_pooled_lse")]
w = 0.2
for j, (k, ko) in enumerate(pairs):
    for jj, kind in enumerate((k, ko)):
        off = (2 * j + jj - 1.5) * w
        ax.bar(np.arange(len(CFGS)) + off, [S["model"][c + (kind,)] for c in CFGS], w, label=kind,
               color=COLORS[kind], hatch="//" if jj else None, edgecolor="k", lw=0.3)
ax.set_xticks(range(len(CFGS)), [cfg_name(c) for c in CFGS], fontsize=9)
ax.set_ylim(1, 2.25)
ax.axhline(1.05, color="k", ls=":", lw=1)
ax.set_ylabel("held-out v-loss / dense")
ax.set_title("Router top-k vs oracle top-k (blocks chosen by true mass); hatched = oracle")
ax.legend(fontsize=8, ncol=2, loc="upper left")
ax.grid(axis="y", alpha=0.3)
save(fig, "router_vs_oracle.png")

# table: variants at ~90% FLOPs removed (<= 0.105 of dense), plus the 32/32 keep 3 references
# (deployable = no oracle, no true-mass mixing; pooled_alphahead left out as an intermediate step)
DEPLOYABLE = ("sparse", "linear_alphahead", "pooled_lse", "pooledblk_lse", "pooled_lselin")
REFS = [(MAIN, k) for k in ("linear_alphahead", "pooled_lse", "pooled_lselin", "oracle_pooled_lse",
                            "exacttail_alphahead")]
rows = [(c, k) for c in CFGS for k in DEPLOYABLE if flops(k, 1024, 64, *c) <= 0.105]
print("\n| config | variant | FLOPs/dense (N=1024) | (N=1032) | v-loss / dense |\n|---|---|---|---|---|")
for part in (sorted(rows, key=lambda ck: S["model"][ck[0] + (ck[1],)]), REFS):
    for c, kind in part:
        print(f"| {cfg_name(c)} | {kind} | {flops(kind, 1024, 64, *c):.3f} | {flops(kind, 1032, 64, *c):.3f} "
              f"| {S['model'][c + (kind,)]:.3f} |")
    print("| | | | | |")
print("\nlinear branch alone, D/N:", {N: round(flops("linear_alphahead", N, 64, 32, 32, 0)
                                          - flops("sparse", N, 64, 32, 32, 0), 4) for N in (1024, 1032)})
print("pooled tail alone:", {bk: round(flops("pooled_x", 1032, 64, bk, bk, 0)
                                       - flops("sparse", 1032, 64, bk, bk, 0), 4) for bk in (16, 32, 64)})
print("one kept block:", {bk: round(flops("sparse", 1032, 64, bk, bk, 1) - flops("sparse", 1032, 64, bk, bk, 0), 4)
                          for bk in (16, 32, 64)})
print("router alone 32/32:", round(flops("sparse", 1032, 64, 32, 32, 0), 4))
print("\nsensitivity (v-loss ratio - 1) / layer-local error:")
for kind in ("linear_alphahead", "pooled_lse"):
    print(kind, [round((S["model"][("single", kind, i)] - 1) / S["layer_local"][MAIN + (kind,)][i], 2) for i in LAYERS])
print("\nmass 32/32 keep 3 per layer (mean), per head:")
for i in LAYERS:
    m = S["mass"][MAIN + (i,)]
    print(i, round(m.mean().item(), 3), [round(x, 3) for x in m.mean(1).tolist()],
          "in-context", [round(x, 3) for x in m[:, 1024:].mean(1).tolist()] if m.shape[1] > 1024 else "-")
print("\nerror vs t bins (centers", np.round(centers, 3), ")")
for kind in ("sparse", "exacttail_alphahead", "linear_exactmix", "linear_alphahead", "pooled_lse"):
    for i in LAYERS:
        e = S["per_t"][MAIN + (kind, i)].numpy()
        print(kind, i, np.round([e[bins == j].mean() for j in range(5)], 4), "coef. of variation over samples",
              round(float(e.std() / e.mean()), 2))
print("\nsum of single-layer excess vs all-layer excess (32/32 keep 3):")
for kind in ("linear_alphahead", "pooled_lse"):
    print(kind, round(sum(S["model"][("single", kind, i)] - 1 for i in LAYERS), 4),
          round(S["model"][MAIN + (kind,)] - 1, 4))
print("\nfitted per-layer biases (grid -1 .. 2), 32/32 keep 3:")
for kind in ("pooled_lse", "pooledblk_lse", "pooled_lselin", "oracle_pooled_lse"):
    print(kind, [S["bias"][MAIN + (kind, i)] for i in LAYERS])
print("layers at the grid's lower edge (-1), all configs and _lse kinds:",
      sum(v == -1.0 for v in S["bias"].values()), "of", len(S["bias"]))
print("\nrouter vs oracle, model v-loss ratio:")
for c in CFGS:
    print(cfg_name(c), *(f"{k} {S['model'][c + (k,)]:.3f}/{S['model'][c + ('oracle_' + k,)]:.3f}"
                         for k in ("linear_alphahead", "pooled_lse")))
print("\nexacttail_alphahead model ratio per config:",
      [round(S["model"][c + ("exacttail_alphahead",)], 3) for c in CFGS])
