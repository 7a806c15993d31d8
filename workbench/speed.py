"""What makes a compiled training step fast and is not the model's: one CUDA graph a step
(CUDAGraphed), and inductor's pool of compile workers started early and stopped once compiled."""
import torch


def start_compile_workers():
    """Call before loading data. Inductor compiles each graph's Triton kernels in a pool of worker
    processes, which it starts at its first compile and which takes seconds to come up (each
    worker imports torch); until then it compiles them one at a time in this process. Started
    here, the pool comes up while the data loads."""
    from torch._inductor.async_compile import maybe_warm_pool
    maybe_warm_pool()


def stop_compile_workers():
    """Call once the first steps have compiled. With a warm cache the model compiles before the
    pool of compile workers (one per CPU) has finished starting, and for seconds the workers then
    take the CPUs the data loader needs. A later compile would start them again."""
    from torch._inductor.async_compile import shutdown_compile_workers
    shutdown_compile_workers()


class CUDAGraphed:
    """fn (of fixed-shape device tensors) as one CUDA graph, by PyTorch's recipe: two warm-up calls
    on a side stream (they compile and autotune), the capture on the third, replays after it. The
    inputs are copied into the graph's own; the outputs are the graph's tensors, overwritten by
    the next call. Whatever else fn reads must stay on the device at fixed addresses."""

    def __init__(self, fn, device, warmup_calls: int = 2):
        self.fn, self.device, self.warmup_calls = fn, device, warmup_calls
        self.graph, self.inputs, self.outputs = None, None, None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, *inputs):
        if self.graph is None and self.warmup_calls > 0:
            self.warmup_calls -= 1
            side, main = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                out = self.fn(*inputs)
            main.wait_stream(side)
            return out
        if self.graph is None:
            self.inputs, self.graph = tuple(x.clone() for x in inputs), torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = self.fn(*self.inputs)
        for static, x in zip(self.inputs, inputs):
            static.copy_(x)
        self.graph.replay()
        return self.outputs
