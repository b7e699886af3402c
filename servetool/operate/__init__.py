"""The operate layer: what runs a deployment over time, through any target's verbs.

package (spec -> export -> gate -> archive), the lifecycle (versions, promote, rollback, the record
in deployed.json), the watcher and its sources, canary releases, the crash supervisor and the
detached helpers (daemon), monitoring (monitor, top, dashboard) and a pod's watcher. The CLI sits on
top of it; targets, engines, convert and model below.
"""
