-- A worker ends a request it holds: finished ("length", "stop") or failed ("error"), storing
-- its last tokens first (in the same step, so a request never ends with tokens missing).
-- ARGV: prefix, rid, worker, reason, error, retention_s, first index, token ids, text
-- Returns {'ok', stored count} | {'lost', state} | {'gap', stored count}
-- @include now
-- @include notify
-- @include store_tokens
-- @include finalize
local p, rid, worker, reason, err = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local req = p .. 'req:' .. rid
local f = redis.call('HMGET', req, 'state', 'worker', 'out')
if f[1] ~= 'running' or f[2] ~= worker then
  return {'lost', f[1] or 'gone'}
end
local stored = store_tokens(p, rid, tonumber(f[3]), tonumber(ARGV[7]), ARGV[8], ARGV[9])
if not stored then return {'gap', f[3]} end
redis.call('ZREM', p .. 'leases', rid)
redis.call('SREM', p .. 'running:' .. worker, rid)
local state = 'finished'
if reason == 'error' then state = 'failed' end
finalize(p, rid, state, reason, err, now_ms(), tonumber(ARGV[6]))
return {'ok', tostring(stored)}
