"""Counters for benchmarks/probe.py: loaded into `crishim serve` and `crishim port-forward`
through PYTHONPATH when CRISHIM_PROBE names an output directory. Wraps the hot callbacks
(reads, writes, pause/resume) and counts calls and bytes; SIGUSR1 writes the counts to
CRISHIM_PROBE/<pid>.json. Nothing is changed when CRISHIM_PROBE is unset."""

import os

if os.environ.get("CRISHIM_PROBE"):
    import builtins
    import json
    import signal
    import sys

    _OUT = os.environ["CRISHIM_PROBE"]
    _COUNTS: dict = {}
    _TARGETS = {  # module -> [(class, method)]
        "crishim.stream.session": [("SessionProtocol", "data_received"),
                                   ("SessionProtocol", "buffer_updated"),
                                   ("PairChannel", "send")],
        "crishim.forward_base": [("Forwarded", "start")],
        "crishim.stream.pairing": [("StreamPairs", "add")],
        "crishim.forward": [("_PodProtocol", "buffer_updated"),
                            ("_PodProtocol", "pause_writing"),
                            ("_PodProtocol", "resume_writing"),
                            ("SessionBase", "pause_writing"),
                            ("SessionBase", "resume_writing"),
                            ("ForwardedConnection", "flush_batch"),
                            ("ForwardedConnection", "pause_pod_reading"),
                            ("ForwardedConnection", "resume_pod_reading"),
                            ("ForwardedConnection", "client_data"),
                            ("ForwardedConnection", "pod_data"),
                            ("SessionBase", "open_connection")],
        "crishim.protocols.spdy.connection": [("SpdyConnection", "receive_data")],
        "crishim.metrics": [("Metrics", "connection_started"), ("Metrics", "dial_seconds")],
        "crishim.netns": [(None, "socket_in_netns"), (None, "dial_localhost")],
        "crishim.stream.portforward_spdy": [("SpdyPortForwardSession", "flush")],
        "crishim.stream.portforward_h2": [("H2PortForwardSession", "flush")],
        "crishim.protocols.h2": [("H2Codec", "receive_data"), ("H2Codec", "send_data"),
                                 ("H2Codec", "take_output")],
        "crishim.client.transports.h2": [("H2ClientSession", "receive"),
                                         ("H2ClientSession", "_receive_events"),
                                         ("H2ClientSession", "_on_data"),
                                         ("H2ClientSession", "_flush")],
        "crishim.client.portforward": [("_LocalSide", "connection_made"),
                                       ("_LocalSide", "data_received"),
                                       ("_LocalSide", "pause_writing"),
                                       ("_LocalSide", "resume_writing"),
                                       ("_RemoteSide", "data_received"),
                                       ("_RemoteSide", "pause_writing"),
                                       ("_RemoteSide", "resume_writing")],
        "crishim.stream.server": [("_RequestProtocol", "connection_made"),
                                  ("_RequestProtocol", "data_received"),
                                  ("StreamServer", "dispatch"), ("StreamServer", "adopt")],
        "crishim.stream.portforward_ws": [(None, "start")],
        "crishim.client.cri": [("CriClient", "port_forward")],
        "crishim.client.transports": [(None, "open_session")],
        "crishim.client.transports.websocket": [(None, "_websocket_upgrade")],
        "crishim.client.transports.base": [("ClientSession", "open_connection_nowait"),
                                           ("StreamPairSession", "_send_go"),
                                           ("UpgradeProtocol", "data_received"),
                                           ("UpgradeProtocol", "pause_writing"),
                                           ("UpgradeProtocol", "resume_writing"),
                                           ("ClientSession", "_write_raw"),
                                           ("ClientSession", "pause_stream"),
                                           ("ClientSession", "resume_stream")],
    }

    def _size(arg) -> int:
        if isinstance(arg, (bytes, bytearray, memoryview)):
            return len(arg)
        if isinstance(arg, list):
            return sum(len(x) for x in arg
                       if isinstance(x, (bytes, bytearray, memoryview)))
        return 0

    import time
    _TIMELINE: list = []  # (key, CLOCK_MONOTONIC ns): shared with the benchmark process
    _now = time.perf_counter_ns

    def _wrap(owner, name: str, key: str) -> None:
        fn = owner.__dict__.get(name)
        if fn is None:
            return
        entry = _COUNTS.setdefault(key, [0, 0])

        def counted(*args, _fn=fn, _e=entry, _k=key, **kw):
            _e[0] += 1
            if len(args) > 1:
                _e[1] += _size(args[1])
            if len(_TIMELINE) > 1_000_000:
                return _fn(*args, **kw)
            _TIMELINE.append((_k, _now()))
            try:
                return _fn(*args, **kw)
            finally:
                _TIMELINE.append((_k + " returned", _now()))

        setattr(owner, name, counted)

    def _patch(module) -> None:
        for cls_name, meth in _TARGETS.get(module.__name__, ()):
            if cls_name is None:  # a module-level function
                _wrap(module, meth, f"{module.__name__.rsplit('.', 1)[1]}.{meth}")
                continue
            cls = getattr(module, cls_name, None)
            if cls is not None:
                _wrap(cls, meth, f"{module.__name__.rsplit('.', 1)[1]}.{cls_name}.{meth}")

    _real_import = builtins.__import__
    _done: set = set()

    def _import(name, *args, **kw):
        module = _real_import(name, *args, **kw)
        for mod_name in list(_TARGETS):
            if mod_name not in _done and mod_name in sys.modules and \
                    getattr(sys.modules[mod_name], "__spec__", None) is not None and \
                    getattr(sys.modules[mod_name], "_probe_ready", True):
                mod = sys.modules[mod_name]
                # wait until the module has finished executing (its classes exist)
                if all(c is None or hasattr(mod, c) for c, _ in _TARGETS[mod_name]) and \
                        all(hasattr(mod, m) for c, m in _TARGETS[mod_name] if c is None):
                    _done.add(mod_name)
                    _patch(mod)
        return module

    builtins.__import__ = _import

    def _dump(*_):
        with open(os.path.join(_OUT, f"{os.getpid()}.json"), "w") as f:
            json.dump({"counts": _COUNTS, "timeline": _TIMELINE}, f)
        _TIMELINE.clear()

    signal.signal(signal.SIGUSR1, _dump)

if os.environ.get("CRISHIM_PROFILE"):  # a cProfile of the process, written on SIGUSR2
    import cProfile
    import signal as _signal

    _profile = cProfile.Profile()

    def _profile_dump(*_):
        _profile.disable()
        _profile.dump_stats(os.path.join(os.environ["CRISHIM_PROFILE"],
                                         f"{os.getpid()}.prof"))
        _profile.clear()
        _profile.enable()

    _signal.signal(_signal.SIGUSR2, _profile_dump)
    _profile.enable()
