"""Running independent tasks on a pool of workers: in this process, on local processes
(`--procs N`) or on Ray actors (`--ray N|auto`), with one hand-out loop, retries and clear stops.

Below both `pipeline` (embedding shards) and `indexes` (index and dedup tasks): it knows tasks
only as picklable values with a `name`, and workers only as what a picklable factory makes.
"""
