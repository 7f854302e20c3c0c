-- Appends output tokens of request `rid` whose stored count is `out`. Indexes make it
-- idempotent: tokens below `out` are dropped, so a retried append or a request resumed
-- elsewhere never duplicates output. Returns the new count, or nil for a gap (first > out).
local function store_tokens(p, rid, out, first, ids_text, text)
  if first > out then return nil end
  local ids = {}
  for id in string.gmatch(ids_text, '%S+') do ids[#ids + 1] = id end
  if first + #ids <= out then return out end
  if first < out then
    -- a resend overlapping what is stored: keep only the new tail (text cannot be split at a
    -- token boundary, so this rare path stores ids only)
    local tail = {}
    for i = out - first + 1, #ids do tail[#tail + 1] = ids[i] end
    ids, text, first = tail, '', out
  end
  local joined = table.concat(ids, ' ')
  local id = redis.call('XADD', p .. 'out:' .. rid, '*', 'i', first, 't', joined, 'x', text)
  redis.call('HSET', p .. 'req:' .. rid, 'out', first + #ids)
  if out == 0 then
    redis.call('HSET', p .. 'req:' .. rid, 'first_token_ms', now_ms())
  end
  notify_watchers(p, rid, cjson.encode({r = rid, id = id, i = first, t = joined, x = text}))
  return first + #ids
end
