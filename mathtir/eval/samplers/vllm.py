"""vLLM sampler: one AsyncLLMEngine per actor (one GPU, or a tensor-parallel group of --sampler-gpus).

A thin adapter, untested on this platform: vLLM needs a GPU and does not install here (the README says so and
names the versions it is written against: 0.10 and 0.11, the V1 engine behind ``AsyncLLMEngine``). It speaks
token ids like the HF sampler, so the TIR loop's budget stays exact, and vLLM's own continuous batching keeps
every trajectory in flight on the GPU. Prefix caching is on by default: each round of a trajectory repeats
the previous rounds as its prompt, and the engine reuses their KV blocks instead of prefilling them again.

At TP>1 the engine's Ray executor starts one worker per GPU inside the placement group the job made for this
replica (``mathtir.eval.actors.place_sampler_replicas``): the actor holds no GPU of its own.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from mathtir.eval.samplers import Generation, GenerationRequest


class VLLMSampler:
    uses_token_ids = True
    chat = False

    def __init__(self, model_dir: str | Path, *, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                 max_num_seqs: int = 256, enable_prefix_caching: bool = True):
        try:
            from vllm import AsyncEngineArgs, AsyncLLMEngine
        except ImportError as e:
            raise RuntimeError("--backend vllm needs vLLM installed on the GPU nodes (the evaluation "
                               "container has it); use --backend hf on machines without a GPU") from e
        engine_args = AsyncEngineArgs(
            model=str(model_dir), tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            enable_prefix_caching=enable_prefix_caching,
            # TP>1: Ray workers in the current placement group (the replica's); TP=1: in this process
            distributed_executor_backend="ray" if tensor_parallel_size > 1 else "uni")
        self.engine = AsyncLLMEngine.from_engine_args(engine_args)
        self._stats = {"requests": 0, "generated_tokens": 0}

    async def generate(self, request: GenerationRequest) -> Generation:
        from vllm import SamplingParams

        params = SamplingParams(
            n=1, temperature=request.temperature, top_p=request.top_p, seed=request.seed,
            max_tokens=request.max_new_tokens, stop=list(request.stop), include_stop_str_in_output=True)
        final = None
        async for output in self.engine.generate({"prompt_token_ids": request.prompt_ids}, params,
                                                 request_id=uuid.uuid4().hex):
            final = output
        completion = final.outputs[0]
        if completion.finish_reason == "length":
            reason = "length"
        else:  # vLLM reports a matched stop string in stop_reason; None (or a token id) means eos
            reason = "stop" if isinstance(completion.stop_reason, str) else "eos"
        ids = list(completion.token_ids)
        self._stats["requests"] += 1
        self._stats["generated_tokens"] += len(ids)
        return Generation(token_ids=ids, text=completion.text, num_tokens=len(ids), finish_reason=reason)

    def stats(self) -> dict:
        return dict(self._stats, backend="vllm")
