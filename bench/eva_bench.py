"""EVA initialisation time: dist_lora vs PEFT (one process), and per-rank PCA time at DP=2 vs DP=1.

    python bench/eva_bench.py [--hidden 256 --layers 4 --batch 4 --seq 128] [--json out.json]

Model: the HF Llama of models.py (random weights, fp32), LoRA r (default 16) with
init_lora_weights="eva" on all linear layers of the decoder (q/k/v/o, gate/up/down),
EvaConfig(rho=2, tau=0.99). Data: --batches fixed batches of random tokens, some positions
padded (attention_mask 0) and some labels -100, cycled until EVA converges.

Part 1 (one process, --threads torch threads): ``get_eva_state_dict`` of dist_lora and of
PEFT on the same model and data, alternating rounds; sanity first: both give the same ranks
and the same components (the algorithms are the same; see tests/test_eva.py).

Part 2 (forked gloo ranks, 1 thread each; no megatron: WORLD is the data-parallel group, as
for an HF model under torchrun): the same global batches split over 2 DP ranks (each rank
gets half the sequences of every batch) vs 1 rank with all of them. Reported per rank: the
PCA time (incremental-PCA updates of the layers this rank owns), the time in the hooks
(masking + gathers to the owners), the whole call, and the number of PCAs owned. At DP=2
the PCAs are divided between the ranks, so the per-rank PCA time should roughly halve; the
gathers add communication. Rounds alternate DP=1 and DP=2. The two ranks share this
machine's cores with each other (and with other jobs).
"""

from __future__ import annotations

import copy
import multiprocessing as mp
import os
import pickle
import socket
import statistics
import traceback
import warnings

import torch

import common

common.quiet()
import models  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def eva_batches(args) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(args.batches):
        ids = torch.randint(args.vocab, (args.batch, args.seq), generator=gen)
        attention = torch.ones_like(ids)
        attention[0, -args.seq // 8 :] = 0
        labels = ids.clone()
        labels[attention == 0] = -100
        labels[-1, : args.seq // 4] = -100
        out.append(dict(input_ids=ids, attention_mask=attention, labels=labels))
    return out


def lora_kwargs(args) -> dict:
    return dict(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS, init_lora_weights="eva")


def ours_model(base, args):
    from dist_lora import EvaConfig, LoraConfig, get_lora_model

    return get_lora_model(copy.deepcopy(base), LoraConfig(**lora_kwargs(args), eva_config=EvaConfig(rho=2.0, tau=0.99)), seed=0)


def peft_model(base, args):
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lora_kwargs(args), eva_config=peft.EvaConfig(rho=2.0, tau=0.99)))


# --- part 1: dist_lora vs PEFT -----------------------------------------------------------------


def part1(base, data, args) -> dict:
    from peft.tuners.lora.eva import get_eva_state_dict as peft_eva

    from dist_lora.init.eva import get_eva_state_dict, last_run_info

    ours, theirs = ours_model(base, args), peft_model(base, args)

    def run_ours():
        return get_eva_state_dict(ours, data, show_progress_bar=False)

    def run_peft():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {k.removeprefix("base_model.model."): v for k, v in peft_eva(theirs, data, show_progress_bar=False).items()}

    a, b = run_ours(), run_peft()
    batches = last_run_info().batches
    same_ranks = {k: v.shape[0] for k, v in a.items()} == {k: v.shape[0] for k, v in b.items()}
    diff = max((a[k] - b[k].float()).abs().max().item() for k in a if a[k].numel())
    common.show(["", "value"], [["layers", len(a)], ["EVA batches to converge", batches], ["same ranks", same_ranks],
                                ["max |A_dist_lora - A_peft|", f"{diff:.1e}"]],
                f"Sanity: {'same' if same_ranks and diff < 1e-4 else 'DIFFERENT'}")
    common.say(f"timing: {args.warmup} warm-up + {args.rounds} alternating rounds")
    times = common.alternate({"dist_lora": run_ours, "peft": run_peft}, args.rounds, args.warmup)
    ratios = {"dist_lora / peft": common.ratio(times, "dist_lora", "peft")}
    common.show_times(times, "get_eva_state_dict time (s), one process")
    common.show_ratios(ratios, {}, "Time ratio")
    return {"sanity": {"same_ranks": same_ranks, "max_abs_diff": diff, "batches": batches},
            "timing": common.timing_summary(times), "ratios": ratios}


# --- part 2: DP=2 vs DP=1 (forked gloo ranks) -------------------------------------------------------


def _rank_main(rank, world, port, fn, results):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    try:
        dist.init_process_group("gloo")
        results.put((rank, True, pickle.dumps(fn())))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def forked(fn, world: int) -> list:
    """Run fn() on ``world`` forked gloo ranks (WORLD = the DP group); results by rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, fn, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    out = dict((rank, (ok, payload)) for rank, ok, payload in (results.get(timeout=600) for _ in procs))
    for p in procs:
        p.join()
    errors = [payload for ok, payload in out.values() if not ok]
    if errors:
        raise RuntimeError("\n".join(errors))
    return [pickle.loads(out[r][1]) for r in range(world)]


def part2(base, data, args) -> dict:
    def eva_on_ranks():
        import torch.distributed as dist

        from dist_lora.init.eva import get_eva_state_dict, last_run_info

        world, rank = dist.get_world_size(), dist.get_rank()
        per = args.batch // world
        mine = [{k: v[rank * per : (rank + 1) * per] for k, v in b.items()} for b in data]
        state = get_eva_state_dict(ours_model(base, args), mine, show_progress_bar=False)
        info = last_run_info()
        return dict(pca=info.pca_seconds, hooks=info.gather_seconds, total=info.total_seconds, owned=info.groups_owned,
                    work=info.pca_work,
                    groups=info.groups, batches=info.batches, ranks={k: v.shape[0] for k, v in state.items()})

    runs = {"DP=1": lambda: forked(eva_on_ranks, 1), "DP=2": lambda: forked(eva_on_ranks, 2)}
    per_round: dict[str, list[list[dict]]] = {n: [] for n in runs}
    for k in range(args.warmup + args.dp_rounds):
        order = list(runs) if k % 2 == 0 else list(runs)[::-1]
        for name in order:
            res = runs[name]()
            if k >= args.warmup:
                per_round[name].append(res)
            common.say(f"  round {k + 1}{' (warm-up)' if k < args.warmup else ''}: {name} "
                       + ", ".join(f"rank {i}: pca {r['pca']:.2f}s total {r['total']:.2f}s" for i, r in enumerate(res)))
    same = per_round["DP=1"][0][0]["ranks"] == per_round["DP=2"][0][0]["ranks"]
    rows, summary = [], {}
    for name, rounds in per_round.items():
        world = len(rounds[0])
        for rank in range(world):
            med = {key: statistics.median(r[rank][key] for r in rounds) for key in ("pca", "hooks", "total")}
            rows.append([name, rank, rounds[0][rank]["owned"], rounds[0][rank]["groups"], rounds[0][rank]["batches"],
                         med["pca"], med["hooks"], med["total"]])
            summary[f"{name} rank {rank}"] = {**med, "owned": rounds[0][rank]["owned"], "batches": rounds[0][rank]["batches"],
                                              "rounds": [r[rank] for r in rounds]}
    common.show(["layout", "rank", "PCAs owned", "PCAs", "batches", "PCA s (median)", "hooks s", "total s"], rows,
                f"Per-rank EVA time, same global data (same ranks as DP=1: {same})")
    pca1 = summary["DP=1 rank 0"]["pca"]
    pca2 = max(summary["DP=2 rank 0"]["pca"], summary["DP=2 rank 1"]["pca"])
    common.say(f"per-rank PCA time DP=2 (slowest rank) / DP=1: {pca2 / pca1:.3f}\n")
    # PCA work (deterministic): Σ over updates of rows·in_features, the SVD cost's size factor
    total = sum(per_round["DP=1"][0][0]["work"].values())
    shares = [sum(r["work"].values()) / total for r in per_round["DP=2"][0]]
    by_group = per_round["DP=1"][0][0]["work"]
    longest = max(by_group.values()) / total
    common.show(["", "value"], [
        ["DP=2 rank 0 share of the PCA work", f"{shares[0]:.3f}"],
        ["DP=2 rank 1 share of the PCA work", f"{shares[1]:.3f}"],
        ["largest single PCA (one group) share: the floor", f"{longest:.3f}"],
    ] + [[f"  {name}", f"{w / total:.3f}"] for name, w in sorted(by_group.items(), key=lambda kv: -kv[1])],
        "PCA work division (Σ rows·in_features over the updates; deterministic)")
    return {"same_ranks_as_dp1": same, "per_rank": summary, "pca_ratio_dp2_over_dp1": pca2 / pca1,
            "work_shares_dp2": shares, "largest_group_share": longest,
            "work_by_group": {n: w / total for n, w in by_group.items()}}


def main() -> None:
    p = common.parser(__doc__)
    models.add_model_args(p, hidden=256, layers=4, batch=4, seq=128, vocab=1024)
    common.add_timing_args(p, rounds=3, threads=True)
    p.add_argument("--batches", type=int, default=8, help="distinct batches in the dataloader (default 8)")
    p.add_argument("--dp-rounds", type=int, default=3, help="timed rounds of part 2 (default 3)")
    p.add_argument("--skip-peft", action="store_true", help="only part 2")
    p.add_argument("--skip-dp", action="store_true", help="only part 1")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    common.say(f"HF Llama: {models.describe(args)}; LoRA r={args.r}, EVA rho=2 tau=0.99 on {TARGETS}; "
               f"{args.batches} batches, cycled\n")
    base = models.hf_llama(args)
    base.eval()
    data = eva_batches(args)
    results = {"model": models.describe(args)}
    if not args.skip_peft:
        results["vs_peft"] = part1(base, data, args)
    if not args.skip_dp:
        results["data_parallel"] = part2(base, data, args)
    common.write_json(args.json, results, args)


if __name__ == "__main__":
    main()
