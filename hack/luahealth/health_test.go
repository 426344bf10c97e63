// Tests docs/argocd-health.lua, the Argo CD health check of dbpool.io/DbPool, with gopher-lua, the
// Lua interpreter Argo CD runs it in: the same libraries (base, package, table, string, math; no os
// or io), the object handed over as the global `obj` the way Argo CD converts it, and the returned
// table read as its health status. One fixture in testdata/ per phase and edge case.
//
//	cd hack/luahealth && GOFLAGS=-mod=mod GOSUMDB=off go test ./...   # `make argocd-health`
package luahealth

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	lua "github.com/yuin/gopher-lua"
)

const script = "../../docs/argocd-health.lua"

// Argo CD's health statuses (gitops-engine pkg/health).
var validStatuses = map[string]bool{
	"Healthy": true, "Progressing": true, "Degraded": true, "Suspended": true, "Missing": true, "Unknown": true,
}

// toLua converts a decoded JSON value as Argo CD's util/lua does: objects and arrays become tables
// (arrays 1-based), numbers LNumber, null nil.
func toLua(l *lua.LState, v any) lua.LValue {
	switch v := v.(type) {
	case map[string]any:
		t := l.NewTable()
		for k, e := range v {
			t.RawSetString(k, toLua(l, e))
		}
		return t
	case []any:
		t := l.NewTable()
		for _, e := range v {
			t.Append(toLua(l, e))
		}
		return t
	case float64:
		return lua.LNumber(v)
	case string:
		return lua.LString(v)
	case bool:
		return lua.LBool(v)
	default:
		return lua.LNil
	}
}

type health struct{ Status, Message string }

func evaluate(t *testing.T, fixture string) health {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join("testdata", fixture+".json"))
	if err != nil {
		t.Fatal(err)
	}
	var obj map[string]any
	if err := json.Unmarshal(raw, &obj); err != nil {
		t.Fatalf("%s: %v", fixture, err)
	}
	src, err := os.ReadFile(script)
	if err != nil {
		t.Fatal(err)
	}
	l := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer l.Close()
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
		{lua.StringLibName, lua.OpenString},
		{lua.MathLibName, lua.OpenMath},
	} {
		l.Push(l.NewFunction(lib.open))
		l.Push(lua.LString(lib.name))
		l.Call(1, 0)
	}
	l.SetGlobal("obj", toLua(l, obj))
	if err := l.DoString(string(src)); err != nil {
		t.Fatalf("%s: script failed: %v", fixture, err)
	}
	ret, ok := l.Get(-1).(*lua.LTable)
	if !ok {
		t.Fatalf("%s: script returned %s, not a table", fixture, l.Get(-1).Type())
	}
	h := health{Status: lua.LVAsString(ret.RawGetString("status")), Message: lua.LVAsString(ret.RawGetString("message"))}
	if !validStatuses[h.Status] {
		t.Fatalf("%s: %q is not an Argo CD health status", fixture, h.Status)
	}
	return h
}

func TestEveryPhase(t *testing.T) {
	refused := "connection refused by 10.96.14.2:5432"
	cases := []struct {
		fixture string
		want    health
	}{
		{"no-status", health{"Progressing", "Waiting for the operator to probe the pool (no status yet)"}},
		{"pending", health{"Progressing", "Pending: not probed yet"}},
		{"healthy", health{"Healthy", "Healthy: ok: PostgreSQL 15.8, primary"}},
		{"healthy-without-kstatus-conditions", health{"Healthy", "Healthy: ok: PostgreSQL 15.8, primary"}},
		{"degraded", health{"Degraded", "Degraded: ok: PostgreSQL 15.8, primary; pool.maxSize 20 would not fit into the 7 free connection slots"}},
		{"recovering", health{"Degraded", "Recovering after 2 failed probes: " + refused}},
		{"breaker-open", health{"Degraded", "Circuit breaker open (next trial probe at 2026-05-04T10:16:02.123456Z): " + refused}},
		{"breaker-half-open", health{"Progressing", "Circuit breaker half-open, trial probes decide: ok: PostgreSQL 15.8, primary"}},
		{"breaker-held", health{"Suspended", "Circuit breaker held by alice@example.com: failover drill (dbpool.io/hold)"}},
		{"breaker-forced-open", health{"Suspended", "Circuit breaker held open (breaker.mode ForcedOpen): ok: PostgreSQL 15.8, primary"}},
		{"cooling-down", health{"Degraded", "CoolingDown until 2026-05-04T10:20:02.123456Z: connection to 10.96.14.2:5432 timed out"}},
		{"config-error", health{"Degraded", `ConfigError: password authentication failed for user "app" (28P01)`}},
		{"config-error-without-kstatus-conditions", health{"Degraded", `ConfigError: password authentication failed for user "app" (28P01)`}},
		{"generation-not-observed", health{"Progressing", "Waiting for the operator to observe generation 3 (status is for 2)"}},
		{"deleting", health{"Progressing", "DbPool is being deleted"}},
		{"unknown-phase-ready", health{"Healthy", "Throttled: ok: PostgreSQL 15.8, primary"}},
	}
	seen := map[string]bool{}
	for _, c := range cases {
		seen[c.fixture] = true
		t.Run(c.fixture, func(t *testing.T) {
			if got := evaluate(t, c.fixture); got != c.want {
				t.Errorf("got  %+v\nwant %+v", got, c.want)
			}
		})
	}
	// Every fixture is asserted, and every phase of the API has one.
	files, _ := filepath.Glob("testdata/*.json")
	phases := map[string]bool{}
	for _, f := range files {
		name := strings.TrimSuffix(filepath.Base(f), ".json")
		if !seen[name] {
			t.Errorf("testdata/%s.json has no expectation", name)
		}
		raw, _ := os.ReadFile(f)
		var o struct {
			Status struct{ Phase string } `json:"status"`
		}
		_ = json.Unmarshal(raw, &o)
		phases[o.Status.Phase] = true
	}
	for _, p := range []string{"Pending", "Healthy", "Degraded", "Recovering", "BreakerOpen", "CoolingDown", "ConfigError"} {
		if !phases[p] {
			t.Errorf("no fixture in phase %s", p)
		}
	}
}

// The argocd-cm snippet in docs/kstatus.md is the script, verbatim.
func TestDocSnippetIsTheScript(t *testing.T) {
	src, err := os.ReadFile(script)
	if err != nil {
		t.Fatal(err)
	}
	doc, err := os.ReadFile("../../docs/kstatus.md")
	if err != nil {
		t.Fatal(err)
	}
	const key = "  resource.customizations.health.dbpool.io_DbPool: |\n"
	_, after, found := strings.Cut(string(doc), key)
	if !found {
		t.Fatalf("docs/kstatus.md has no %q", key)
	}
	block, _, _ := strings.Cut(after, "```")
	var lines []string
	for _, line := range strings.Split(strings.TrimRight(block, "\n"), "\n") {
		lines = append(lines, strings.TrimPrefix(line, "    "))
	}
	if got := strings.Join(lines, "\n") + "\n"; got != string(src) {
		t.Errorf("the argocd-cm snippet in docs/kstatus.md differs from docs/argocd-health.lua; paste the script again (indented by 4)")
	}
}
