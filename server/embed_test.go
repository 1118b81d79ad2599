package server_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
	"github.com/batonhq/baton/server/servertest"
)

// A scheduler that already has an HTTP server mounts the node's handler
// and tells baton its address.
func TestHandlerMountsInAnExistingServer(t *testing.T) {
	e := testutil.Etcd(t, 1)
	mux := http.NewServeMux()
	srv := httptest.NewServer(mux)
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "http://")

	cfg := server.DefaultConfig()
	cfg.Client = e.Client()
	cfg.ServerID = "mounted"
	cfg.TTL = time.Second
	cfg.Control = coord.Endpoint{Address: addr}
	n, err := server.NewNode(cfg)
	if err != nil {
		t.Fatal(err)
	}
	mux.Handle("/server/", n.Handler())
	mux.Handle("/friend/", n.Handler())
	w := newWorker(t)

	// Before Start the node answers, but says it is not started.
	if r := w.get(addr, "/server/hello", nil); r.status != http.StatusServiceUnavailable || r.success {
		t.Fatalf("before Start: %d %v", r.status, r.success)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := n.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer n.Close(ctx)
	if err := n.Start(ctx); err == nil {
		t.Fatal("second Start succeeded")
	}
	app, _ := n.Registry().Register(ctx, "orders")
	if got := acquire(t, w, addr, app.ID); got != addr {
		t.Fatalf("acquire through the mounted handler: %s, want %s", got, addr)
	}
	if r := w.get(addr, "/server/assert", url.Values{"appName": {"orders"}}); !r.success {
		t.Fatalf("assert: %q", r.message)
	}
	if r := w.get(addr, "/friend/ping", nil); !r.success {
		t.Fatalf("ping of a running node: %d %q", r.status, r.message)
	}
	// The scheduler's HTTP server outlives the node: after a crash the
	// mounted handler must not tell peers the node is alive.
	servertest.Crash(n)
	if r := w.get(addr, "/friend/ping", nil); r.success || r.status != http.StatusServiceUnavailable {
		t.Fatalf("ping after a crash: %d %v %q; want 503", r.status, r.success, r.message)
	}
}
