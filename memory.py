"""What each model and each job needs in VRAM, what a GPU has, and who may use it now.

Numbers come from bench/memory_table.json (see its `_about`). Nothing here imports torch or
initialises CUDA: the orchestrator imports this module before it starts any child process.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, Protocol, Sequence

log = logging.getLogger(__name__)

FAMILIES = ("sdxl", "wan", "chat")
GIB = 1024**3
# A hostile or unusual script can take more than one token per character: count two per token.
CHARS_PER_TOKEN = 2
TABLE_PATH = Path(os.environ.get("GENQ_MEMORY_TABLE", Path(__file__).with_name("bench") / "memory_table.json"))

# Redis keys shared by the orchestrator, the daemons and `python -m orchestrator status`.
GPU_KEY = "genq:gpu:{host}:{gpu}"            # admission state of one card (JSON, see Admission)
PLAN_KEY = "genq:plan:{host}"                # the orchestrator's placement (JSON list of GpuPlan)
SUPERVISOR_KEY = "genq:orchestrator:{host}"  # hash: pid, heartbeat, children (JSON)
DAEMON_KEY = "genq:daemon:{worker}"          # hash each daemon keeps fresh, fields below
DAEMON_FIELDS = ("family", "gpu", "host", "resident_bytes", "models", "current_job", "progress", "updated_at")


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f} GiB"


# --- probing -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuInfo:
    index: int  # NVML (PCI bus) order; children get CUDA_DEVICE_ORDER=PCI_BUS_ID to agree
    name: str
    total_bytes: int
    used_bytes: int = 0

    @property
    def usable_bytes(self) -> int:
        return self.total_bytes - table()["card_reserve_bytes"]


class GpuProbe(Protocol):
    def gpus(self) -> list[GpuInfo]: ...


def _visible(gpus: list[GpuInfo], uuids: dict[int, str] | None = None) -> list[GpuInfo]:
    """Apply CUDA_VISIBLE_DEVICES (indices or GPU UUIDs) while keeping physical indices."""
    spec = os.environ.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return gpus
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    uuids = uuids or {}
    return [g for g in gpus if str(g.index) in wanted or uuids.get(g.index) in wanted]


class NvmlProbe:
    """nvidia-ml-py: reads the driver's view of the cards without creating a CUDA context."""

    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()  # raises pynvml.NVMLError where there is no driver
        self._nvml = pynvml

    def gpus(self) -> list[GpuInfo]:
        nv = self._nvml
        found, uuids = [], {}
        for i in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(i)
            mem = nv.nvmlDeviceGetMemoryInfo(handle)
            name = nv.nvmlDeviceGetName(handle)
            uuids[i] = nv.nvmlDeviceGetUUID(handle)
            found.append(GpuInfo(i, name.decode() if isinstance(name, bytes) else name, int(mem.total), int(mem.used)))
        return _visible(found, uuids)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(GB|GIB|G|MB|MIB|M)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'48GB' -> bytes. A card sold as 'N GB' has about N GiB, so GB and GiB both mean GiB here."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a memory size: {text!r} (expected e.g. 48GB or 81920MB)")
    unit = (m.group(2) or "B").upper()
    scale = GIB if unit.startswith("G") else 1024**2 if unit.startswith("M") else 1
    return int(float(m.group(1)) * scale)


class SimulatedProbe:
    """Cards from GENQ_SIMULATED_GPUS, e.g. "48GB" or "80GB,80GB" (tests, CPU machines)."""

    def __init__(self, spec: str) -> None:
        self._gpus = [GpuInfo(i, f"Simulated {s.strip()}", parse_size(s)) for i, s in enumerate(spec.split(","))]

    def gpus(self) -> list[GpuInfo]:
        return _visible(list(self._gpus))


def get_probe() -> GpuProbe | None:
    spec = os.environ.get("GENQ_SIMULATED_GPUS")
    if spec:
        return SimulatedProbe(spec)
    try:
        return NvmlProbe()
    except Exception as exc:  # no driver, no library: a CPU machine
        log.info("no NVML (%s): no GPUs", exc)
        return None


# --- the numbers -------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def table() -> dict:
    return json.loads(TABLE_PATH.read_text())


def _family_parts(family: str, settings: Any) -> dict[str, str]:
    """Part name in the table -> the configured model path it belongs to."""
    if family == "sdxl":
        path = settings.sdxl_model_path
        return {p: path for p in ("sdxl.unet", "sdxl.text_encoders", "sdxl.vae")} if path else {}
    if family == "wan":
        parts = {}
        if settings.wan_model_path:
            parts["wan.transformer"] = settings.wan_model_path
        if settings.wan_vace_model_path:
            parts["wan_vace.transformer"] = settings.wan_vace_model_path
        if parts:
            shared = next(iter(parts.values()))
            parts.update({"wan.text_encoder": shared, "wan.vae": shared})
        return parts
    if family == "chat":
        return {name: path for name, path in (("qwen_instruct", settings.qwen_instruct_model_path),
                                              ("qwen_base", settings.qwen_base_model_path)) if path}
    raise ValueError(f"unknown family {family!r} (expected one of {', '.join(FAMILIES)})")


def resident_parts(family: str, settings: Any) -> dict[str, int]:
    """Weights each part keeps on the GPU; "tiny" models count as a few MiB."""
    t = table()
    size = "bytes"
    if family == "chat":
        from pipelines.chat_options import BatchOptions  # torch-free

        size = "fp8_bytes" if BatchOptions.from_env().weights == "fp8" else "bytes"
    parts = {part: t["tiny_part_bytes"] if path == "tiny" else t["parts"][part].get(size, t["parts"][part]["bytes"])
             for part, path in _family_parts(family, settings).items()}
    if family == "chat" and parts and not all(p == "tiny" for p in _family_parts(family, settings).values()):
        pool = chat_kv_pool_bytes()
        if pool:
            parts["chat.kv_pool"] = pool
    return parts


def chat_kv_pool_bytes(environ: Any = None) -> int:
    """The chat engine's KV pool, allocated at start and kept (GENQ_CHAT_*, pipelines/chat_options.py).
    Counted unless batching is switched off: on a GPU it is on by default."""
    from pipelines.chat_options import BatchOptions  # torch-free: the orchestrator imports this module

    options = BatchOptions.from_env(environ)
    if options.enabled is False:
        return 0
    return options.cache_tokens * int(table().get("chat_kv_bytes_per_token", 0))


def resident_bytes(family: str, settings: Any) -> int:
    """What a daemon of this family holds on its card while idle: CUDA context plus weights."""
    return table()["process_overhead_bytes"] + sum(resident_parts(family, settings).values())


def job_units(request: Any) -> int:
    """The size that working memory grows with: pixels*images, pixels*frames or tokens."""
    family = request.family
    if family == "sdxl":
        return request.width * request.height * request.num_images
    if family == "wan":
        return request.width * request.height * request.num_frames
    if family == "chat":
        if getattr(request, "tokens", None):  # exact count, where the caller tokenised already
            return int(request.tokens)
        chars = sum(len(m.content) for m in getattr(request, "messages", ()) or ())
        return chars // CHARS_PER_TOKEN + int(request.max_new_tokens)
    raise ValueError(f"unknown family {family!r}")


def _interpolate(points: Sequence[tuple[int, int]], x: int) -> float:
    pts = sorted(points)
    if not pts or pts[0][0] > 0:
        pts.insert(0, (0, 0))
    if len(pts) == 1:
        return float(pts[0][1])
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            break
    # past the last point this extrapolates with the last segment's slope
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


# A WAN job in fast mode (pipelines/step_cache.py) keeps diffusers' first-block cache state for the
# conditional and the unconditional pass: 3 hidden-state tensors each (head output, head residual, tail
# residual) of latent tokens x 1536 (WAN 2.1 1.3B's width) in bf16. A latent token covers 16x16 pixels of
# 4 frames (VAE 8x8x4, patches 2x2): 2 x 3 x 1536 x 2 bytes / 1024 = 18 bytes per pixel-frame, ~0.6 GB
# at 832x480x81. Not in the measured table (bench/memory_table.py measured the uncached path).
WAN_STEP_CACHE_BYTES_PER_UNIT = 18


def job_peak_bytes(request: Any) -> int:
    """Working memory a job needs ON TOP of its daemon's resident weights (what to reserve)."""
    spec = table()["jobs"][request.family]
    points = [(p["units"], p["peak_bytes"] - p["resident_bytes"]) for p in spec["points"]]
    peak = max(0.0, _interpolate(points, job_units(request)))
    if request.family == "wan" and getattr(request, "fast_mode", False):
        peak += WAN_STEP_CACHE_BYTES_PER_UNIT * job_units(request)
    return int(peak * table()["safety_factor"])


def job_need_bytes(request: Any, settings: Any) -> int:
    """The whole footprint of running this job: its daemon's resident bytes plus the job's peak."""
    return resident_bytes(request.family, settings) + job_peak_bytes(request)


def shape(family: str, **fields: Any) -> Any:
    """A stand-in request of a given shape (for plans and messages)."""
    return SimpleNamespace(family=family, **fields)


def describe_shape(request: Any) -> str:
    if request.family == "sdxl":
        return f"{request.width}x{request.height} x{request.num_images} image(s)"
    if request.family == "wan":
        return f"{request.width}x{request.height} x{request.num_frames} frame(s)"
    return f"{job_units(request)} tokens"


def largest_allowed_job(family: str) -> Any:
    """The biggest job schemas/limits.py lets through for a family."""
    from schemas.limits import LIMITS

    if family == "sdxl":
        side = int(LIMITS.sdxl_max_pixels**0.5) // 8 * 8
        return shape("sdxl", width=side, height=side, num_images=6)
    if family == "wan":
        side = int(LIMITS.wan_max_pixels**0.5) // 16 * 16
        return shape("wan", width=side, height=side, num_frames=LIMITS.wan_max_frames)
    return shape("chat", tokens=LIMITS.chat_max_input_chars // CHARS_PER_TOKEN + LIMITS.chat_max_new_tokens)


# --- plans ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuPlan:
    gpu: GpuInfo
    families: tuple[str, ...]

    def ceiling(self) -> int:
        """The most one daemon here can ever hold: the card minus the others' CUDA contexts
        (their weights can always be moved to CPU to make room)."""
        return self.gpu.usable_bytes - table()["process_overhead_bytes"] * (len(self.families) - 1)

    def to_json(self) -> dict:
        return {"index": self.gpu.index, "name": self.gpu.name, "total_bytes": self.gpu.total_bytes,
                "families": list(self.families)}

    @classmethod
    def from_json(cls, d: dict) -> "GpuPlan":
        return cls(GpuInfo(d["index"], d["name"], d["total_bytes"]), tuple(d["families"]))


@dataclass
class CardCheck:
    plan: GpuPlan
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    offload: bool = False  # idle models must move to CPU for the largest reference job


def check_card(plan: GpuPlan, settings: Any) -> CardCheck:
    """Whether each family on this card can run its reference job, and what that costs."""
    out, gpu = CardCheck(plan), plan.gpu
    where = f"GPU {gpu.index} ({gpu.name}, {gib(gpu.usable_bytes)} usable)"
    residents = {f: resident_bytes(f, settings) for f in plan.families}
    all_resident = sum(residents.values())
    for family in plan.families:
        if not _family_parts(family, settings):
            out.errors.append(f"{where}: {family} has no model path configured")
            continue
        ref = shape(family, **table()["reference_jobs"][family])
        need = residents[family] + job_peak_bytes(ref)
        if need > plan.ceiling():
            contexts = gpu.usable_bytes - plan.ceiling()
            out.errors.append(
                f"{where}: {family} cannot run its reference job ({describe_shape(ref)}): it needs "
                f"{gib(residents[family])} resident + {gib(job_peak_bytes(ref))} working memory, and the "
                f"{len(plan.families) - 1} other daemon(s) keep {gib(contexts)} of CUDA context: "
                f"{gib(need + contexts)} > {gib(gpu.usable_bytes)}")
            continue
        if all_resident - residents[family] + need > gpu.usable_bytes:
            out.offload = True
        big = largest_allowed_job(family)
        if residents[family] + job_peak_bytes(big) > plan.ceiling():
            out.notes.append(f"{where}: {family} jobs as large as the limits allow ({describe_shape(big)}, "
                             f"{gib(residents[family] + job_peak_bytes(big))}) do not fit; they are rejected "
                             "unless another GPU can run them")
    if out.offload and not out.errors:
        out.notes.append(f"{where}: all models resident take {gib(all_resident)}; idle models move to CPU "
                         "memory to make room for the largest jobs")
    return out


def fits_anywhere(nbytes: int, gpus: Iterable[GpuPlan]) -> bool:
    """nbytes: a job's whole footprint (job_need_bytes)."""
    return any(nbytes <= g.ceiling() for g in gpus)


def load_fleet(redis, family: str) -> list[GpuPlan]:
    """Every card, on every host whose orchestrator is alive, that serves this family."""
    plans = []
    for key in redis.scan_iter(match=PLAN_KEY.format(host="*")):
        raw = redis.get(key)
        plans += [GpuPlan.from_json(d) for d in json.loads(raw or "[]")]
    return [p for p in plans if family in p.families]


def card_plan(redis, host: str, gpu_index: int) -> GpuPlan | None:
    """This card's entry in its host's published plan (None without a live orchestrator)."""
    raw = redis.get(PLAN_KEY.format(host=host))
    return next((p for p in map(GpuPlan.from_json, json.loads(raw or "[]")) if p.gpu.index == gpu_index), None)


def never_fits_message(request: Any, settings: Any, fleet: Sequence[GpuPlan]) -> str | None:
    """A message for a job no configured GPU could ever hold, else None (also when no plan is known)."""
    need = job_need_bytes(request, settings)
    if not fleet or fits_anywhere(need, fleet):
        return None
    best = max(fleet, key=GpuPlan.ceiling)
    return (f"this job ({describe_shape(request)}) needs about {gib(need)} of GPU memory "
            f"({gib(resident_bytes(request.family, settings))} for the model, {gib(job_peak_bytes(request))} "
            f"for the job); the largest GPU serving {request.family} can give {gib(best.ceiling())}: "
            "ask for fewer images, frames, tokens or a smaller size")


# --- out of memory -----------------------------------------------------------------------------
def is_oom(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError (or a RuntimeError saying so) without importing torch."""
    return any(c.__name__ == "OutOfMemoryError" for c in type(exc).__mro__) or "out of memory" in str(exc).lower()


class OomPolicy:
    """After max_consecutive OOMs in a row the daemon should exit: the orchestrator restarts it
    with a clean allocator (fragmentation and leaked tensors go away with the process)."""

    def __init__(self, max_consecutive: int = 3) -> None:
        self.max_consecutive = max_consecutive
        self.consecutive = 0

    def record(self, exc: BaseException | None) -> bool:
        """Call after every job (exc None on success). True means: exit the process now."""
        self.consecutive = self.consecutive + 1 if exc is not None and is_oom(exc) else 0
        return self.consecutive >= self.max_consecutive


# --- admission between processes sharing a card -------------------------------------------------
# One JSON document per card, read and written only inside these scripts, so every decision is
# atomic. Times are Redis server time (ms), so holders on different clocks agree. Shape:
#   {cap, holders: {name: {family, exp, last, resident, offloadable, jobs: {id: bytes},
#                          wait?: {job, need, since, ticket, seen}, ask?: {by, bytes}}}, tickets}
# Tickets are a counter, so two waiters that started in the same millisecond still have an order.
# A holder that stops refreshing disappears after ttl with all its reservations.
_PRELUDE = """
local key, me, cap, ttl = KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local raw = redis.call('GET', key)
local st = raw and cjson.decode(raw) or {}
st.holders = st.holders or {}
if cap > 0 then st.cap = cap end
for name, o in pairs(st.holders) do
  if o.exp < now then st.holders[name] = nil
  elseif o.wait and o.wait.seen + ttl < now then o.wait = nil end
end
for _, o in pairs(st.holders) do
  if o.ask and not (st.holders[o.ask.by] and st.holders[o.ask.by].wait) then o.ask = nil end
end
local h = st.holders[me]
if not h and ARGV[4] ~= '' then
  -- new, or lost (expired, Redis restarted): the holder's own account of what it holds
  h = cjson.decode(ARGV[5])
  h.family, h.last = ARGV[4], now
  st.holders[me] = h
end
if h then h.exp = now + ttl end
local function save()
  if next(st.holders) == nil then redis.call('DEL', key)
  else redis.call('SET', key, cjson.encode(st), 'PX', ttl * 4) end
end
local function usage()
  local used, resident, pinned = 0, 0, 0
  for name, o in pairs(st.holders) do
    used = used + o.resident
    resident = resident + o.resident
    for _, b in pairs(o.jobs) do used = used + b end
    if name ~= me then pinned = pinned + o.resident - o.offloadable end
  end
  return used, resident, pinned
end
"""

_RESERVE = """
local job, nbytes, load, starve = ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
if h.jobs[job] then save() return cjson.encode({ok = true}) end
local used, resident, pinned = usage()
local need = nbytes + load
local res = {ok = false, need = need, free = st.cap - used}
if h.resident + need + pinned > st.cap then
  h.wait = nil
  res.impossible = true
  save() return cjson.encode(res)
end
if not h.wait then st.tickets = (st.tickets or 0) + 1 end
local ticket = h.wait and h.wait.ticket or st.tickets
local head, first = nil, true
for name, o in pairs(st.holders) do
  if name ~= me and o.wait and o.wait.ticket < ticket then
    first = false
    if now - o.wait.since >= starve and (not head or o.wait.ticket < st.holders[head].wait.ticket) then head = name end
  end
end
for _, o in pairs(st.holders) do if o.ask and o.ask.by == me then o.ask = nil end end
if need <= st.cap - used and not head then
  if nbytes > 0 then h.jobs[job] = nbytes end
  h.resident = h.resident + load
  h.offloadable = h.offloadable + load
  h.wait = nil
  h.last = now
  res.ok = true
  save() return cjson.encode(res)
end
res.blocked_by = head
h.wait = {job = job, need = need, since = h.wait and h.wait.since or now, ticket = ticket, seen = now}
-- Only the oldest waiter asks idle daemons to move weights to CPU, and only for what would still
-- be missing once every running job has ended. Those not waiting themselves go first, then the
-- least recently active.
local short = need - (st.cap - resident)
if first and short > 0 then
  local idle = {}
  for name, o in pairs(st.holders) do
    if name ~= me and next(o.jobs) == nil and o.offloadable > 0 then table.insert(idle, name) end
  end
  table.sort(idle, function(a, b)
    local x, y = st.holders[a], st.holders[b]
    if (x.wait == nil) ~= (y.wait == nil) then return x.wait == nil end
    return x.last < y.last
  end)
  res.shortfall = short
  for _, name in ipairs(idle) do
    if short <= 0 then break end
    local o = st.holders[name]
    local take = math.min(o.offloadable, short)
    o.ask = {by = me, bytes = take}
    short = short - take
  end
end
save() return cjson.encode(res)
"""

_RELEASE = """
if h then h.jobs[ARGV[6]] = nil h.last = now end
save() return 1
"""

_SET_RESIDENT = """
h.resident, h.offloadable, h.ask = tonumber(ARGV[6]), tonumber(ARGV[7]), nil
save() return 1
"""

_WITHDRAW = """
if h then h.wait = nil end
for _, o in pairs(st.holders) do if o.ask and o.ask.by == me then o.ask = nil end end
save() return 1
"""

_LEAVE = """
st.holders[me] = nil
for _, o in pairs(st.holders) do if o.ask and o.ask.by == me then o.ask = nil end end
save() return 1
"""

_OFFLOAD_ASKED = """
save()
if h and h.ask and next(h.jobs) == nil then return h.ask.bytes end
return 0
"""

_TOUCH = """
save() return 1
"""


@dataclass(frozen=True)
class Decision:
    """try_reserve's answer; truthy when granted."""

    ok: bool
    need: int = 0
    free: int = 0
    impossible: bool = False  # this card can never hold it, even with every idle model on CPU
    blocked_by: str | None = None  # an older waiter that has priority
    shortfall: int = 0  # bytes idle daemons were asked to move to CPU

    def __bool__(self) -> bool:
        return self.ok


class Admission:
    """Redis-coordinated VRAM reservations on one card, shared by every daemon on it.

    Daemon flow: set_resident() after loading (or try_load() to load only when there is room);
    per job: try_reserve(job_id, job_peak_bytes(request)) until granted, release(job_id) after;
    while idle: if should_offload(): move parts to CPU, set_resident(smaller); to bring them back,
    pass load_bytes to try_reserve. refresh() at least every ttl_s/3 (start_heartbeat() does it).
    Fairness: a job may not overtake a waiter that has waited starve_after_s or longer.
    """

    def __init__(self, redis, host: str, gpu_index: int, capacity_bytes: int, holder: str, ttl_s: int = 30,
                 family: str = "", starve_after_s: float = 20.0) -> None:
        self.redis, self.holder, self.ttl_ms = redis, holder, int(ttl_s * 1000)
        self.capacity, self.family = capacity_bytes, family or holder.split("-", 1)[0]
        self.starve_ms = int(starve_after_s * 1000)
        # what this process holds, so that its entry can be rebuilt if Redis lost it
        self._held: dict[str, Any] = {"resident": 0, "offloadable": 0, "jobs": {}}
        self.key = GPU_KEY.format(host=host, gpu=gpu_index)
        self._scripts = {name: redis.register_script(_PRELUDE + body) for name, body in (
            ("reserve", _RESERVE), ("release", _RELEASE), ("set_resident", _SET_RESIDENT),
            ("withdraw", _WITHDRAW), ("leave", _LEAVE), ("offload", _OFFLOAD_ASKED), ("touch", _TOUCH))}

    def _call(self, name: str, *args: Any, register: bool = True):
        argv = [self.holder, self.capacity, self.ttl_ms, self.family if register else "", json.dumps(self._held), *args]
        return self._scripts[name](keys=[self.key], args=argv)

    def try_reserve(self, job_id: str, nbytes: int, load_bytes: int = 0) -> Decision:
        """Reserve nbytes for a job (and load_bytes of weights to bring back from CPU) if they fit
        now and no older waiter has priority; otherwise join the waiters and ask for room."""
        d = json.loads(self._call("reserve", job_id, int(nbytes), int(load_bytes), self.starve_ms))
        decision = Decision(**{k: v if isinstance(v, (bool, str)) else int(v) for k, v in d.items()})
        if decision and job_id not in self._held["jobs"]:
            if nbytes > 0:
                self._held["jobs"][job_id] = int(nbytes)
            self._held["resident"] += int(load_bytes)
            self._held["offloadable"] += int(load_bytes)
        return decision

    def try_load(self, nbytes: int) -> Decision:
        """Room to load (or reload) nbytes of weights that can later move to CPU."""
        return self.try_reserve(f"load:{self.holder}", 0, load_bytes=nbytes)

    def release(self, job_id: str) -> None:
        self._held["jobs"].pop(job_id, None)
        self._call("release", job_id, register=False)

    def set_resident(self, nbytes: int, offloadable_bytes: int | None = None) -> None:
        """What this process holds on the card now; offloadable: the part that could go to CPU."""
        offloadable = int(nbytes if offloadable_bytes is None else offloadable_bytes)
        self._held.update(resident=int(nbytes), offloadable=offloadable)
        self._call("set_resident", int(nbytes), offloadable)

    def should_offload(self) -> int:
        """Bytes another daemon's waiting job needs this idle daemon to move to CPU (0: none)."""
        return int(self._call("offload", register=False))

    def withdraw(self) -> None:
        """Stop waiting (the job went to another GPU, or the queue is empty)."""
        self._call("withdraw", register=False)

    def refresh(self) -> None:
        self._call("touch")

    def leave(self) -> None:
        """Clean exit: drop this holder and everything it reserved."""
        self._held = {"resident": 0, "offloadable": 0, "jobs": {}}
        self._call("leave", register=False)

    def snapshot(self) -> dict:
        return gpu_snapshot(self.redis, self.key)

    def start_heartbeat(self, interval_s: float | None = None) -> threading.Event:
        """refresh() from a daemon thread until the returned event is set (jobs block the main one)."""
        stop, every = threading.Event(), interval_s or self.ttl_ms / 3000

        def beat() -> None:
            while not stop.wait(every):
                try:
                    self.refresh()
                except Exception as exc:  # Redis away for a moment: the next beat retries
                    log.warning("admission heartbeat failed: %s", exc)

        threading.Thread(target=beat, name="admission-heartbeat", daemon=True).start()
        return stop


def daemon_admission(redis, settings: Any, holder: str, family: str, **kw: Any) -> Admission | None:
    """The Admission of a daemon on settings.gpu_index (None where no GPU is known: CPU runs).
    Registers the process's CUDA context as resident bytes that cannot move to CPU."""
    probe = get_probe()
    card = next((g for g in (probe.gpus() if probe else []) if g.index == settings.gpu_index), None)
    if card is None:
        return None
    admission = Admission(redis, settings.worker_host, card.index, card.usable_bytes, holder, family=family, **kw)
    admission.set_resident(table()["process_overhead_bytes"], 0)
    return admission


def gpu_snapshot(redis, key: str) -> dict:
    """One card's admission state (read-only), expired holders left out, with used/reserved totals."""
    st = json.loads(redis.get(key) or "{}")
    seconds, micros = redis.time()
    now_ms = seconds * 1000 + micros // 1000
    holders = {name: h for name, h in (st.get("holders") or {}).items() if h["exp"] >= now_ms}
    for h in holders.values():
        h["jobs"] = h.get("jobs") or {}
        h["reserved"] = sum(h["jobs"].values())
    return {"key": key, "capacity": st.get("cap", 0), "holders": holders, "now_ms": now_ms,
            "resident": sum(h["resident"] for h in holders.values()),
            "reserved": sum(h["reserved"] for h in holders.values())}
