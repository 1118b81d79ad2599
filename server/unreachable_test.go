package server_test

import (
	"context"
	"testing"
	"time"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/election/electiontest"
	"github.com/batonhq/baton/internal/keyspace"
	"github.com/batonhq/baton/internal/testutil"
	"github.com/batonhq/baton/server"
	"github.com/batonhq/baton/server/servertest"
)

// With etcd unreachable, Kill returns at once and Close within its ctx,
// with an owned app whose ownership is cut short — and every ownership
// context they end carries an end stamp.
func TestKillAndCloseReturnPromptlyWithEtcdUnreachable(t *testing.T) {
	e := testutil.Etcd(t, 1)
	keys, _ := keyspace.New("")
	app, err := testutil.Must(coord.NewRegistry(e.Client(), keys.Prefix())).Register(context.Background(), "x")
	if err != nil {
		t.Fatal(err)
	}
	for _, how := range []string{"Crash", "Close"} {
		t.Run(how, func(t *testing.T) {
			p, url := testutil.Proxy(t, e.Endpoint(0))
			ended := make(chan bool, 1)
			n := startNode(t, e, "s-"+how, func(c *server.Config) {
				c.Client = testutil.Client(t, e, url)
				c.Callbacks.OnAcquire = func(ctx context.Context, _, _ int64) {
					go func() {
						<-ctx.Done()
						_, ok := electiontest.EndedAt(ctx)
						ended <- ok
					}()
				}
			})
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if _, err := n.Elector().Elect(ctx, app.ID, coord.ProtocolHTTP, ""); err != nil {
				t.Fatal(err)
			}
			testutil.Eventually(t, 5*time.Second, "the node to act for the app", func() bool {
				_, ok := n.Elector().Ownership(app.ID)
				return ok
			})
			p.PauseTx()
			p.PauseRx()
			defer func() { p.UnpauseTx(); p.UnpauseRx() }()

			start := time.Now()
			bound := 500 * time.Millisecond // "at once", with room for a loaded machine
			if how == "Crash" {
				servertest.Crash(n)
			} else {
				cctx, ccancel := context.WithTimeout(context.Background(), time.Second)
				defer ccancel()
				n.Close(cctx)
				bound += time.Second
			}
			took := time.Since(start)
			t.Logf("%s with etcd unreachable returned after %v", how, took)
			if took > bound {
				t.Errorf("%s with etcd unreachable took %v; want at most %v", how, took, bound)
			}
			select {
			case ok := <-ended:
				if !ok {
					t.Error("the ownership context ended without an end stamp")
				}
			case <-time.After(5 * time.Second):
				t.Error("the ownership context was not cancelled")
			}
		})
	}
}
