-- Stores output tokens of a running request, if the worker still holds it.
-- ARGV: prefix, rid, worker, first index, token ids (space-separated), text
-- Returns {'ok', stored count} | {'lost', state} | {'gap', stored count}
-- @include now
-- @include notify
-- @include store_tokens
local p, rid, worker = ARGV[1], ARGV[2], ARGV[3]
local f = redis.call('HMGET', p .. 'req:' .. rid, 'state', 'worker', 'out')
if f[1] ~= 'running' or f[2] ~= worker then
  return {'lost', f[1] or 'gone'}
end
local stored = store_tokens(p, rid, tonumber(f[3]), tonumber(ARGV[4]), ARGV[5], ARGV[6])
if not stored then return {'gap', f[3]} end
return {'ok', tostring(stored)}
