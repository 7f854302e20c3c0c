-- Ends a request for good: final output entry, watchers told, state kept for `retention_s`.
local function finalize(p, rid, state, reason, err, now, retention_s)
  local req = p .. 'req:' .. rid
  redis.call('HSET', req, 'state', state, 'finish_reason', reason, 'error', err, 'finish_ms', now)
  local f = redis.call('HMGET', req, 'out', 'prompt_tokens', 'arrival_ms', 'start_ms',
    'first_token_ms', 'deadline_ms', 'group', 'model', 'cls', 'worker', 'tpot_ms')
  for i = 1, 11 do f[i] = f[i] or '' end  -- HMGET gives false for absent fields
  -- the final entry carries the usage, so a reader needs nothing else to close a stream
  local final = {'f', reason, 'e', err, 'n', f[1], 'p', f[2], 'a', f[3], 's', f[4],
    'ft', f[5], 'd', f[6], 'end', now, 'tp', f[11]}
  local id = redis.call('XADD', p .. 'out:' .. rid, '*', unpack(final))
  local message = {r = rid, id = id}
  for i = 1, #final, 2 do message[final[i]] = final[i + 1] end
  notify_watchers(p, rid, cjson.encode(message))
  redis.call('XADD', p .. 'events', 'MAXLEN', '~', 100000, '*', 'type', state, 'rid', rid,
    'gid', f[7], 'model', f[8], 'cls', f[9], 'worker', f[10], 'out', f[1],
    'prompt_tokens', f[2], 'arrival_ms', f[3], 'start_ms', f[4],
    'first_token_ms', f[5], 'deadline_ms', f[6], 'end_ms', now)
  for _, key in ipairs({req, p .. 'out:' .. rid, p .. 'watch:' .. rid}) do
    redis.call('EXPIRE', key, retention_s)
  end
end
