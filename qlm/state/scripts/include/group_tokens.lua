-- Keeps a group's token totals (prompts and max_tokens of its queued requests) for the
-- planner's estimator. A request counts with its context so far (prompt + output stored) and
-- the tokens it may still generate; neither changes while it is queued, so adding on the way
-- in and subtracting on the way out always balance.
local function group_tokens(p, grp, rid, sign)
  local f = redis.call('HMGET', p .. 'req:' .. rid, 'prompt_tokens', 'max_tokens', 'out')
  local out = tonumber(f[3]) or 0
  redis.call('HINCRBY', grp, 'prompt_tokens', sign * ((tonumber(f[1]) or 0) + out))
  redis.call('HINCRBY', grp, 'max_tokens', sign * ((tonumber(f[2]) or 0) - out))
end
