package servertest_test

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
	"github.com/batonhq/baton/server/servertest"
	clientv3 "go.etcd.io/etcd/client/v3"
)

func startNode(t *testing.T, cli *clientv3.Client, id string) *server.Node {
	t.Helper()
	cfg := server.DefaultConfig()
	cfg.Client = cli
	cfg.ServerID = id
	cfg.TTL = time.Second
	cfg.Listen = "127.0.0.1:0"
	cfg.Logger = testutil.Logger(t).Named(id)
	n, err := server.NewNode(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := n.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		n.Close(ctx)
	})
	return n
}

// A crashed node revokes nothing: its lease outlives it, and another
// server takes its app over only once etcd has expired that lease.
func TestCrashLeavesTheLeaseToExpire(t *testing.T) {
	e := testutil.Etcd(t, 1)
	a := startNode(t, testutil.Client(t, e), "a")
	b := startNode(t, testutil.Client(t, e), "b")
	ctx := context.Background()
	app, _ := a.Registry().Register(ctx, "orders")
	if _, err := a.Elector().Elect(ctx, app.ID, coord.ProtocolHTTP, ""); err != nil {
		t.Fatal(err)
	}
	lease := a.Session().Lease()
	crashed := time.Now()
	servertest.Crash(a)
	if ttl, err := e.Client().TimeToLive(ctx, lease); err != nil || ttl.TTL < 0 {
		t.Fatalf("lease gone at once after the crash: %+v, %v", ttl, err)
	}
	testutil.Eventually(t, 10*time.Second, "b to take the app over", func() bool {
		_, ok := b.Elector().Token(app.ID)
		return ok
	})
	if took := time.Since(crashed); took < 500*time.Millisecond {
		t.Errorf("b took over %v after the crash, before a's lease could expire", took)
	}
	if _, err := http.Get("http://" + a.Addr() + "/server/hello"); err == nil {
		t.Error("crashed node still answers HTTP")
	}
	// Close after a crash does nothing and does not fail.
	if err := a.Close(ctx); err != nil {
		t.Errorf("Close after Crash: %v", err)
	}
}
