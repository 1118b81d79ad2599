package embedded_test

import (
	"context"
	"fmt"
	"time"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/coord/embedded"
)

// Start an etcd inside the process and register an app in baton's
// registry on it: the app gets the first id, and registering the same
// name again returns the same app.
func Example() {
	etcd, err := embedded.Start(embedded.Config{})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer etcd.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	registry, err := coord.NewRegistry(etcd.Client(), coord.DefaultPrefix)
	if err != nil {
		fmt.Println(err)
		return
	}
	app, err := registry.Register(ctx, "orders")
	if err != nil {
		fmt.Println(err)
		return
	}
	again, _ := registry.Register(ctx, "orders")
	fmt.Printf("%s has id %d; registered again: id %d\n", app.Name, app.ID, again.ID)
	// Output: orders has id 1; registered again: id 1
}
