"""What a process needs on a cluster: process group, collectives, the run folder and its lock,
read marks, shared-storage probes, preemption, faults, console, tracking, durable writes."""
