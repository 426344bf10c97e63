-- Argo CD health check for dbpool.io/DbPool (docs/kstatus.md explains every mapping).
-- Install: argocd-cm key resource.customizations.health.dbpool.io_DbPool (docs/kstatus.md).
-- Tested with gopher-lua, Argo CD's interpreter: hack/luahealth (make argocd-health).
local hs = {}

local function condition(ctype)
  if obj.status ~= nil and obj.status.conditions ~= nil then
    for _, c in ipairs(obj.status.conditions) do
      if c.type == ctype then
        return c
      end
    end
  end
  return nil
end

-- The last probe's message, else the Ready condition's, else a fallback.
local function detail(fallback)
  local s = obj.status
  if s ~= nil and s.lastProbe ~= nil and s.lastProbe.message ~= nil and s.lastProbe.message ~= "" then
    return s.lastProbe.message
  end
  local ready = condition("Ready")
  if ready ~= nil and ready.message ~= nil and ready.message ~= "" then
    return ready.message
  end
  return fallback
end

local function result(status, message)
  hs.status = status
  hs.message = message
  return hs
end

if obj.metadata ~= nil and obj.metadata.deletionTimestamp ~= nil then
  return result("Progressing", "DbPool is being deleted")
end
local s = obj.status
if s == nil or s.phase == nil then
  return result("Progressing", "Waiting for the operator to probe the pool (no status yet)")
end
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and (s.observedGeneration == nil or s.observedGeneration < generation) then
  return result("Progressing", "Waiting for the operator to observe generation " .. tostring(generation) ..
    " (status is for " .. tostring(s.observedGeneration or "none") .. ")")
end

-- kstatus conditions, when the operator writes them.
local stalled = condition("Stalled")
if stalled ~= nil and stalled.status == "True" then
  return result("Degraded", (stalled.reason or "Stalled") .. ": " .. detail(stalled.message or ""))
end

local reconciling = condition("Reconciling")
if reconciling ~= nil and reconciling.status == "True" and s.phase ~= "Pending" then
  return result("Progressing", (reconciling.reason or "Reconciling") .. ": " .. detail(reconciling.message or ""))
end

local phase = s.phase
local failures = s.consecutiveFailures or 0
if phase == "Healthy" then
  return result("Healthy", "Healthy: " .. detail("the database answered the last probe"))
elseif phase == "Pending" then
  return result("Progressing", "Pending: not probed yet")
elseif phase == "Degraded" then
  return result("Degraded", "Degraded: " .. detail("pool.maxSize does not fit into the free connection slots"))
elseif phase == "ConfigError" then
  return result("Degraded", "ConfigError: " .. detail("configuration error"))
elseif phase == "Recovering" then
  return result("Degraded", "Recovering after " .. tostring(failures) .. " failed probes: " .. detail("retrying"))
elseif phase == "CoolingDown" then
  local untilText = ""
  if s.cooldownUntil ~= nil then
    untilText = " until " .. s.cooldownUntil
  end
  return result("Degraded", "CoolingDown" .. untilText .. ": " .. detail("too many failed attempts"))
elseif phase == "BreakerOpen" then
  local breaker = condition("BreakerOpen")
  local reason = breaker and breaker.reason or ""
  local mode = obj.spec and obj.spec.breaker and obj.spec.breaker.mode or "Auto"
  if reason == "Held" then
    return result("Suspended", "Circuit breaker " .. (breaker.message or "held") .. " (dbpool.io/hold)")
  end
  if reason == "ForcedOpen" or mode == "ForcedOpen" then
    return result("Suspended", "Circuit breaker held open (breaker.mode ForcedOpen): " .. detail("maintenance"))
  end
  if reason == "HalfOpen" or (s.breaker ~= nil and s.breaker.state == "HalfOpen") then
    return result("Progressing", "Circuit breaker half-open, trial probes decide: " .. detail("trial probe"))
  end
  local nextText = ""
  if s.breaker ~= nil and s.breaker.nextProbeAt ~= nil then
    nextText = " (next trial probe at " .. s.breaker.nextProbeAt .. ")"
  end
  return result("Degraded", "Circuit breaker open" .. nextText .. ": " .. detail("database unavailable"))
end

-- A phase this script does not know (a newer operator): fall back on the Ready condition.
local ready = condition("Ready")
if ready ~= nil and ready.status == "True" then
  return result("Healthy", tostring(phase) .. ": " .. detail(""))
end
return result("Degraded", "Unknown phase " .. tostring(phase) .. ": " .. detail(""))
