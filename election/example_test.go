package election_test

import (
	"context"
	"fmt"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/coord/embedded"
	"github.com/batonhq/baton/election"
)

// An elector on a session: elect this server for an app and, once it
// acts for it (OnAcquire), make the app's own writes conditional on
// still owning it. Fence returns the compare to put in the owner's Txn:
// once the app has moved (another server wrote the owner key), etcd
// refuses the write. Elect returning is not yet acting: the server acts
// from OnAcquire, when its watch has shown the key and no displaced
// owner can still be acting.
func Example() {
	etcd, err := embedded.Start(embedded.Config{}) // your cluster in production
	if err != nil {
		fmt.Println(err)
		return
	}
	defer etcd.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cli := etcd.Client()
	registry, err := coord.NewRegistry(cli, coord.DefaultPrefix)
	if err != nil {
		fmt.Println(err)
		return
	}
	app, err := registry.Register(ctx, "orders")
	if err != nil {
		fmt.Println(err)
		return
	}

	session, err := coord.NewSession(ctx, coord.SessionConfig{Client: cli})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer session.Close(ctx)
	cfg := election.DefaultConfig()
	cfg.ServerID = "s1"
	cfg.Control = coord.Endpoint{Address: "10.0.0.21:7700"}
	cfg.Protocols = coord.Protocols{coord.ProtocolHTTP: {Address: "10.0.0.21:10010"}}
	acting := make(chan int64, 1)
	cfg.Callbacks.OnAcquire = func(ctx context.Context, app, token int64) { acting <- app }
	elector, err := election.New(ctx, session, cfg)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer elector.Close(ctx)

	addr, err := elector.Elect(ctx, app.ID, coord.ProtocolHTTP, "")
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("workers of orders send their HTTP traffic to", addr)

	<-acting // in a real scheduler: the app's work runs from OnAcquire
	fence, err := elector.Fence(app.ID)
	if err != nil {
		fmt.Println(err)
		return
	}
	resp, err := cli.Txn(ctx).If(fence).Then(clientv3.OpPut("/my-scheduler/orders/last-run", "now")).Commit()
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("fenced write applied:", resp.Succeeded)
	// Output:
	// workers of orders send their HTTP traffic to 10.0.0.21:10010
	// fenced write applied: true
}
