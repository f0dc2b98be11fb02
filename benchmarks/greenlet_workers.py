"""Cost of a fresh greenlet per invoke (what the interleaver does) against switching into a parked one.

    OMP_NUM_THREADS=1 python benchmarks/greenlet_workers.py

Parked greenlets were reused across traces until a reused one, resumed from another call
chain, crashed the process in PyTorch's C++ backtrace capture (see interleaver._Worker).
"""

import timeit

import greenlet


def main(n=100_000):
    main_greenlet = greenlet.getcurrent()

    def body(x):
        while True:
            x = main_greenlet.switch(x)

    parked = greenlet.greenlet(body)
    parked.switch(0)
    fresh = timeit.timeit(lambda: greenlet.greenlet(lambda x: x).switch(1), number=n) / n
    reused = timeit.timeit(lambda: parked.switch(1), number=n) / n
    print(f"fresh greenlet, created and run once: {fresh * 1e6:.2f} us")
    print(f"switch into a parked greenlet:        {reused * 1e6:.2f} us")


if __name__ == "__main__":
    main()
