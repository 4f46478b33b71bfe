"""``python -m tools.bench``: the end-to-end benchmark of the relay, written up in ``BENCHMARKS.md``.

Every figure runs against the real local Kafka broker, the schema registry double and the tracking API
emulator (its own process), on one backlog of realistic traffic produced once per run. Each contender — the
relay itself, the consume + decode ceiling, a bare aiohttp client, a bare prototype of the batch flow, a naive
consumer, an arroyo pipeline — runs
as its own process, so its CPU time and resident memory are its own; each reads the backlog through a fresh
consumer group. A figure and its reference are measured in turn, repeat by repeat, and the ratio is taken per
repeat: on a noisy 2-core machine the ratio is what is comparable between runs, the absolute rate is not.

Modules, in the order a run uses them:

============================  ========================================================================
``stack``                     the broker, the registry double, emulator processes, topics, the machine
``workload``                  the backlog (seeded traffic, Confluent Avro, 6 partitions); a steady stream
``measure``                   windows of steady-state throughput and CPU, medians and spreads
``contenders``                each contender as a child process, and the relay's configuration
``ceiling``, ``bare_client``  the child programs of the references
``prototype``                 the bare batch flow: what the job costs without the relay's guarantees
``naive``, ``arroyo_pipeline`` the child programs of the comparisons
``figures``                   one function per figure of the report
``profile``                   py-spy on the relay: where the time goes
``report``                    ``BENCHMARKS.md``
============================  ========================================================================
"""
