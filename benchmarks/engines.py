"""lfm2 against transformers and llama.cpp on the same random-weight checkpoint, side by side.

    python benchmarks/engines.py --preset LFM2-350M [--rounds 2] [--prompt 512] [--new 128]

The same as `lfm2 bench` (the code lives in `lfm2/bench.py`, so an installed package has it).
"""

from lfm2.bench import main

if __name__ == "__main__":
    main()
