"""The atomic steps on KV memories in Redis, as Lua scripts (see ``kv_store`` for how they are used).

Each script's KEYS and ARGV are described above it; errors are ``EXTMIND_*`` replies that
``kv_store`` turns into ``extmind.errors``.

``touch_us`` in the meta hash is the last time (Redis's clock, microseconds) a BUILDING memory was
created or written by an append stream; the reaper (``kv_reaper``) deletes a BUILDING memory idle
for longer than MEMORY_BUILDING_TTL. It is Redis's clock so that every memory service on one Redis
judges it alike, and written as a string: Lua prints a 16-digit number as 1.7e+15.
"""

# The caller's scripts begin with this: NOW_US, Redis's time in microseconds, as a string.
_NOW = """
local t = redis.call('TIME')
local NOW_US = t[1] .. string.format('%06d', tonumber(t[2]))
"""

# KEYS: meta, tokens, positions. ARGV: meta fields (JSON list), token bytes, position bytes
# -> 1 created, 0 exists already
CREATE = (
    _NOW
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(cjson.decode(ARGV[1])))
redis.call('HSET', KEYS[1], 'touch_us', NOW_US)
if #ARGV[2] > 0 then redis.call('SET', KEYS[2], ARGV[2]) end
if #ARGV[3] > 0 then redis.call('SET', KEYS[3], ARGV[3]) end
return 1
"""
)

# Runs inside the MULTI/EXEC right after the SETs of the chunk's two keys.
# KEYS: meta, keys chunk, values chunk, the layer's chunk list. ARGV: layer, rows, bytes, chunk name,
# the create_us of the memory the stream opened (one deleted and created again under the same id is
# another memory: NOT_FOUND) -> {rows after, ready}
LINK_CHUNK = (
    _NOW
    + """
local meta = KEYS[1]
local state = redis.call('HGET', meta, 'state')
local function refuse(why)
  redis.call('UNLINK', KEYS[2], KEYS[3])
  return redis.error_reply(why)
end
if not state or redis.call('HGET', meta, 'create_us') ~= ARGV[5] then return refuse('EXTMIND_NOT_FOUND') end
if state ~= 'BUILDING' then return refuse('EXTMIND_NOT_BUILDING ' .. state) end
local layer = ARGV[1]
local n = tonumber(ARGV[2])
local expected = tonumber(redis.call('HGET', meta, 'expected'))
local rows = tonumber(redis.call('HGET', meta, 'r:' .. layer) or '0')
if expected >= 0 and rows + n > expected then return refuse('EXTMIND_OVERFLOW ' .. rows .. ' ' .. expected) end
redis.call('RPUSH', KEYS[4], ARGV[4])
redis.call('HINCRBY', meta, 'c:' .. layer, 1)
local after = redis.call('HINCRBY', meta, 'r:' .. layer, n)
redis.call('HINCRBY', meta, 'bytes', tonumber(ARGV[3]))
redis.call('HSET', meta, 'touch_us', NOW_US)
local ready = 0
if expected >= 0 and after == expected and n > 0 then
  local full = redis.call('HINCRBY', meta, 'full', 1)
  if full == tonumber(redis.call('HGET', meta, 'num_layers')) then
    redis.call('HSET', meta, 'state', 'READY')
    ready = 1
  end
end
return {after, ready}
"""
)

# An append stream opened the memory, or this service holds a stream on it open: it is alive.
# Only a BUILDING memory's hash is touched (HSET on a deleted one would recreate half of it).
# KEYS: meta -> 1 touched, 0 missing or not BUILDING
TOUCH = (
    _NOW
    + """
if redis.call('HGET', KEYS[1], 'state') ~= 'BUILDING' then return 0 end
redis.call('HSET', KEYS[1], 'touch_us', NOW_US)
return 1
"""
)

# Without token ids: READY when the stream closes and every layer holds the same rows (> 0).
# KEYS: meta -> {state, rows of layer 0, equal}
FINISH = """
local meta = KEYS[1]
local state = redis.call('HGET', meta, 'state')
if not state then return redis.error_reply('EXTMIND_NOT_FOUND') end
local layers = tonumber(redis.call('HGET', meta, 'num_layers'))
local first = tonumber(redis.call('HGET', meta, 'r:0') or '0')
local equal = 1
for i = 1, layers - 1 do
  if tonumber(redis.call('HGET', meta, 'r:' .. i) or '0') ~= first then equal = 0 end
end
if state == 'BUILDING' and tonumber(redis.call('HGET', meta, 'expected')) < 0 and equal == 1 and first > 0 then
  redis.call('HSET', meta, 'state', 'READY')
  state = 'READY'
end
return {state, first, equal}
"""

# Undo one failed stream's chunks while the memory is still BUILDING, and still the memory the
# stream opened (same create_us: one created again under its id since holds none of its rows).
# KEYS: meta, base. ARGV: stream name, create_us, then layer, rows before, ... -> 1 rolled back, 0 not
ROLLBACK = """
local meta = KEYS[1]
if redis.call('HGET', meta, 'state') ~= 'BUILDING' then return 0 end
if redis.call('HGET', meta, 'create_us') ~= ARGV[2] then return 0 end
local expected = tonumber(redis.call('HGET', meta, 'expected'))
local prefix = ARGV[1] .. '.'
local freed = 0
for i = 3, #ARGV, 2 do
  local layer, r0 = ARGV[i], tonumber(ARGV[i + 1])
  local list = KEYS[2] .. ':chunks:' .. layer
  local r1 = tonumber(redis.call('HGET', meta, 'r:' .. layer) or '0')
  for _, name in ipairs(redis.call('LRANGE', list, 0, -1)) do
    if string.sub(name, 1, #prefix) == prefix then
      local k = KEYS[2] .. ':k:' .. layer .. ':' .. name
      local v = KEYS[2] .. ':v:' .. layer .. ':' .. name
      freed = freed + redis.call('STRLEN', k) + redis.call('STRLEN', v)
      redis.call('UNLINK', k, v)
      redis.call('LREM', list, 1, name)
    end
  end
  if expected >= 0 and r1 == expected and r0 < expected then redis.call('HINCRBY', meta, 'full', -1) end
  redis.call('HSET', meta, 'c:' .. layer, redis.call('LLEN', list), 'r:' .. layer, r0)
end
-- Only when something was freed: Lua's -0 reaches Redis as "-0", which HINCRBY refuses (a stream
-- failing before any of its chunks landed).
if freed > 0 then redis.call('HINCRBY', meta, 'bytes', -freed) end
return 1
"""

# DeleteMemory, and the reaper with ARGV[1]: then only a BUILDING memory untouched for more than
# ARGV[1] microseconds (by Redis's clock) is deleted, decided in the same script that deletes it,
# so an append landing just before wins and one landing after finds no memory (EXTMIND_NOT_FOUND).
# A memory without touch_us (written before it existed) counts from create_us. With ARGV[2] (a
# create_us) only the memory created then is deleted.
# KEYS: meta, base. ARGV: idle microseconds or '', create_us or '' -> 1 deleted, 0 missing, -1 kept
# (busy or READY), -2 kept (created at another time): kv_store's DELETED ... KEPT_OTHER_INCARNATION
DELETE = (
    _NOW
    + """
local meta = KEYS[1]
local layers = tonumber(redis.call('HGET', meta, 'num_layers'))
if not layers then return 0 end
if ARGV[2] and ARGV[2] ~= '' and redis.call('HGET', meta, 'create_us') ~= ARGV[2] then return -2 end
if ARGV[1] and ARGV[1] ~= '' then
  if redis.call('HGET', meta, 'state') ~= 'BUILDING' then return -1 end
  local touched = redis.call('HGET', meta, 'touch_us') or redis.call('HGET', meta, 'create_us')
  if tonumber(NOW_US) - tonumber(touched) <= tonumber(ARGV[1]) then return -1 end
end
for layer = 0, layers - 1 do
  local list = KEYS[2] .. ':chunks:' .. layer
  for _, name in ipairs(redis.call('LRANGE', list, 0, -1)) do
    redis.call('UNLINK', KEYS[2] .. ':k:' .. layer .. ':' .. name, KEYS[2] .. ':v:' .. layer .. ':' .. name)
  end
  redis.call('UNLINK', list)
end
redis.call('UNLINK', meta, KEYS[2] .. ':tokens', KEYS[2] .. ':positions')
return 1
"""
)
