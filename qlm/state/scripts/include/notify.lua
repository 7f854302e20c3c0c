-- Tells every router relaying request `rid` about a new output entry.
local function notify_watchers(p, rid, message)
  local routers = redis.call('SMEMBERS', p .. 'watch:' .. rid)
  for _, router in ipairs(routers) do
    redis.call('PUBLISH', p .. 'relay:' .. router, message)
  end
end
