"""The python grader's side of the sandbox (run as a script inside it; stdlib only).

It limits itself before any of the grader's code runs: memory, file size, processes,
CPU seconds, core dumps; as root (bubblewrap run by a root server) it then becomes an
unprivileged user, so that the process limit holds (the kernel exempts root). Then it
reads one JSON line (the source), answers whether `grade(sample, item)` exists, and
grades one JSON line (`{"sample", "item"}`) at a time, answering `{"reward"}` or
`{"error"}`, each with the request's number. The grader's own prints go to stderr, not
to this protocol (a grader that writes to it anyway desynchronises nothing: a reply with
the wrong number ends the process and fails that grade).
"""

import json
import math
import numbers
import os
import resource
import sys
import traceback

MAX_DETAILS = 2000


def limit(limits):
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["disk_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"],) * 2)
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 1))
    cores = sorted(os.sched_getaffinity(0))[: limits["cpus"]]
    os.sched_setaffinity(0, cores)
    if os.getuid() == 0:
        os.setgroups([])
        os.setgid(limits["uid"])
        os.setuid(limits["uid"])


def details():
    return traceback.format_exc(limit=-5)[-MAX_DETAILS:]


def main():
    limits = json.loads(sys.argv[1])
    limit(limits)
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # the grader's prints
    sys.stdout = sys.stderr

    main_pid = os.getpid()

    def answer(message):
        if os.getpid() != main_pid:  # a process the grader forked, back in this loop
            os._exit(0)
        message["n"] = number  # which request this answers
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    request = json.loads(sys.stdin.readline())
    source, number = request["source"], request["n"]
    namespace = {"__name__": "grader"}
    try:
        exec(compile(source, "grader.py", "exec"), namespace)  # the user's grader, sandboxed
        grade = namespace["grade"]
        if not callable(grade):
            raise TypeError("grade is not a function")
    except BaseException:
        answer({"error": details()})
        return
    answer({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        number = request["n"]
        try:
            reward = grade(request["sample"], request["item"])
            if isinstance(reward, bool) or not isinstance(reward, numbers.Real):
                raise TypeError(f"grade returned {type(reward).__name__}, not a float")
            reward = float(reward)
            if not math.isfinite(reward):
                raise ValueError(f"grade returned {reward}, not a finite float")
            answer({"reward": reward})
        except BaseException:
            answer({"error": details()})


main()
