package worker_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"go.uber.org/goleak"

	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/worker"
)

// Close must stop every goroutine the discovery started, also while the
// servers it talked to are still up. The worker's own HTTP client (nil
// Config.HTTPClient) keeps the connections of its rounds alive for 90 s;
// each idle keep-alive connection is two goroutines of net/http
// (persistConn.readLoop and writeLoop) that outlive Close.
func TestCloseLeavesNoIdleHTTPConnection(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if strings.HasPrefix(r.URL.Path, "/server/assert") {
			w.Write([]byte(`{"success":true,"data":7,"message":""}`))
			return
		}
		w.Write([]byte(`{"success":true,"data":"` + strings.TrimPrefix("http://"+r.Host, "http://") + `","message":""}`))
	}))
	defer srv.Close()
	before := goleak.IgnoreCurrent()

	cfg := worker.DefaultConfig()
	cfg.AppName = "orders"
	cfg.Servers = []string{strings.TrimPrefix(srv.URL, "http://")}
	cfg.Logger = testutil.Logger(t)
	d, err := worker.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	if s, ok := d.Current(); !ok || s.Address != cfg.Servers[0] {
		t.Fatalf("worker at %+v", s)
	}
	d.Close()
	// The server's side of the connection is the test's, not the worker's.
	if err := goleak.Find(before, goleak.IgnoreAnyFunction("net/http.(*conn).serve")); err != nil {
		t.Fatalf("goroutines left running after Close, while the server is still up:\n%v", err)
	}
}
