-- A worker that tokenized a text prompt records its true length: the router could only store
-- an upper bound (UTF-8 bytes). Only while the worker holds the request, which is then in no
-- group, so the groups' token totals stay consistent when it returns to one.
-- ARGV: prefix, rid, worker, prompt_tokens
-- Returns {'ok', prompt_tokens} | {'lost', state}
local p, rid, worker, n = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local req = p .. 'req:' .. rid
local f = redis.call('HMGET', req, 'state', 'worker')
if f[1] ~= 'running' or f[2] ~= worker then
  return {'lost', f[1] or 'gone'}
end
redis.call('HSET', req, 'prompt_tokens', n)
return {'ok', n}
