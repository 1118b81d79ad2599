package server_test

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/keyspace"
	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
	"github.com/batonhq/baton/server/servertest"
)

// A node closed and started again in the same process, with the same id
// and the same metrics registry, starts (its metrics left the registry
// with it) and counts afresh; so do a node killed and one that failed to
// start.
func TestNodeRestartsInOneProcessWithOneRegistry(t *testing.T) {
	e := testutil.Etcd(t, 1)
	reg := prometheus.NewRegistry()
	app, err := testutil.Must(coord.NewRegistry(e.Client(), mustKeys(t).Prefix())).Register(context.Background(), "orders")
	if err != nil {
		t.Fatal(err)
	}
	withReg := func(c *server.Config) { c.Registerer = reg }
	for round := 1; round <= 3; round++ {
		n := startNode(t, e, "s1", withReg)
		if _, err := n.Elector().Elect(context.Background(), app.ID, coord.ProtocolHTTP, ""); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		if got := testutil.Metric(t, reg, "baton_election_elections_total", "won"); got != 1 {
			t.Fatalf("round %d: %v elections won in this node's metrics, want 1", round, got)
		}
		if got := testutil.Metric(t, reg, "baton_session_confirmed", ""); got != 1 {
			t.Fatalf("round %d: baton_session_confirmed = %v, want 1", round, got)
		}
		resp, err := http.Get("http://" + n.Addr() + "/server/hello")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if got := testutil.Metric(t, reg, "baton_http_requests_total", "/server/hello"); got != 1 {
			t.Fatalf("round %d: %v requests to /server/hello counted, want 1", round, got)
		}
		if round == 2 {
			servertest.Crash(n)
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err = n.Close(ctx)
		cancel()
		if err != nil {
			t.Fatalf("round %d: Close: %v", round, err)
		}
	}
	if fams, _ := reg.Gather(); len(fams) != 0 {
		t.Errorf("%d metric families left in the registry after the last Close", len(fams))
	}
}

func mustKeys(t testing.TB) keyspace.Keys {
	keys, err := keyspace.New(coord.DefaultPrefix)
	if err != nil {
		t.Fatal(err)
	}
	return keys
}
