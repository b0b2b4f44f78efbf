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
        "crishim.forward": [("SessionProtocol", "data_received"),
                            ("_PodProtocol", "data_received"),
                            ("_PodProtocol", "pause_writing"),
                            ("_PodProtocol", "resume_writing"),
                            ("SessionBase", "pause_writing"),
                            ("SessionBase", "resume_writing"),
                            ("ForwardedConnection", "flush_batch"),
                            ("ForwardedConnection", "pause_pod_reading"),
                            ("ForwardedConnection", "resume_pod_reading")],
        "crishim.stream.portforward_spdy": [("_SpdyChannel", "send"),
                                            ("SpdyPortForwardSession", "flush")],
        "crishim.client.portforward": [("_LocalSide", "data_received"),
                                       ("_LocalSide", "pause_writing"),
                                       ("_LocalSide", "resume_writing"),
                                       ("_RemoteSide", "data_received"),
                                       ("_RemoteSide", "pause_writing"),
                                       ("_RemoteSide", "resume_writing")],
        "crishim.client.session": [("_ConnectionProtocol", "data_received"),
                                   ("_ConnectionProtocol", "pause_writing"),
                                   ("_ConnectionProtocol", "resume_writing"),
                                   ("ClientSession", "_write_raw"),
                                   ("ClientSession", "_pause_input"),
                                   ("ClientSession", "_resume_input")],
    }

    def _size(arg) -> int:
        if isinstance(arg, (bytes, bytearray, memoryview)):
            return len(arg)
        if isinstance(arg, list):
            return sum(len(x) for x in arg)
        return 0

    def _wrap(cls, name: str, key: str) -> None:
        fn = cls.__dict__.get(name)
        if fn is None:
            return
        entry = _COUNTS.setdefault(key, [0, 0])

        def counted(self, *args, _fn=fn, _e=entry):
            _e[0] += 1
            if args:
                _e[1] += _size(args[0])
            return _fn(self, *args)

        setattr(cls, name, counted)

    def _patch(module) -> None:
        for cls_name, meth in _TARGETS.get(module.__name__, ()):
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
                if all(hasattr(mod, c) for c, _ in _TARGETS[mod_name]):
                    _done.add(mod_name)
                    _patch(mod)
        return module

    builtins.__import__ = _import

    def _dump(*_):
        with open(os.path.join(_OUT, f"{os.getpid()}.json"), "w") as f:
            json.dump(_COUNTS, f)

    signal.signal(signal.SIGUSR1, _dump)
