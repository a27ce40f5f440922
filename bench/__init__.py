"""em-bench: the microbenchmark suite of em-kernels (run `em-bench --help` or `python -m bench`).

Layout:
    harness.py   the measurement loop: device ceilings, timing, peak memory, error vs float64
    report.py    terminal table, CSV, markdown summary, PNG plot
    ops/         one module per op family; each declares its shapes, byte and FLOP counts,
                 providers and float64 oracle
    gpu_check.sh the one script to run on a GPU machine: build, GPU tests, headline benchmarks
    prebuild_for_gpu.sh, prebuilt.py   gpu_check.sh's build, made ahead on a machine without a GPU
    RESULTS.md   the latest GPU results
"""
