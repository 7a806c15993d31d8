"""What is not one training run: the tools around asmae_minimal.py. Nothing here imports the
script; what a tool needs of it (a model, a precision, a train step, a function that trains a
--compare cell) comes in as arguments, as facebookresearch/mae's engine files take theirs.

    data          the images (CIFAR, a folder, fake) and the loaders; augment.py, augment_kernel.py
    evaluate      held-out loss and PSNR, linear probe, kNN, fine-tuning (--eval, each sweep cell)
    compare       the variants x seeds sweep (--compare) and its resume
    report        the sweep's means, paired CIs (scipy), table, cells.csv and figures
    benchmark     --benchmark N: step time, img/s, memory parts, MFU; profile: --profile's groups
    kernel_bench  the quantization kernels at a model's GEMM shapes, with their achieved GB/s
    schedule      the one learning-rate schedule (MAE's warm-up + cosine)
    cli           argv -> (Command, Config): flags from the Config's fields, validated once;
                  --compare's variants, a resumed run's changes, the device
    files         atomic writes, strict JSON, run folders and the lock that keeps runs apart,
                  checkpoints (saved, read as untrusted input, loaded into either backend's
                  model), metrics.jsonl written (RunLog) and read back
    speed         the train step's CUDA graph (CUDAGraphed), inductor's compile-worker pool
    loss_guard    skips non-finite steps on the device; stops a run after too many in a row
    errors        UsageError (one line, exit 2), StopRequest / Interrupted (signals)

Imports point one way: asmae_minimal -> workbench -> nvfp4.
"""
