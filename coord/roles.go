package coord

import (
	"context"
	"errors"
	"fmt"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/internal/keyspace"
)

// The etcd roles of a baton deployment with etcd's authentication on
// (SetupRoles). Give each server process a user with RoleServer and each
// worker a user with RoleWorker.
const (
	// RoleServer may read and write every key under the prefix, and
	// nothing else: leases, the per-app mutex, owner Txns, membership
	// and the registry all stay inside it.
	RoleServer = "baton-server"
	// RoleWorker may only read what discovery reads: owner keys
	// ({p}/current-server/), the app registry ({p}/apps/) and the live
	// servers ({p}/servers/, to ask the app's next owner first). It
	// cannot write, delete or revoke anything.
	RoleWorker = "baton-worker"
)

// SetupRoles creates (or completes) RoleServer and RoleWorker for the
// deployment under prefix ("" means DefaultPrefix). root must be a client
// allowed to manage roles (etcd's root user). Running it again changes
// nothing. It does not create users or enable authentication: see the
// README's "Security" section for the whole recipe.
func SetupRoles(ctx context.Context, root *clientv3.Client, prefix string) error {
	keys, err := keyspace.New(prefix)
	if err != nil {
		return err
	}
	p := keys.Prefix() + "/"
	grants := []struct {
		role, key string
		perm      clientv3.PermissionType
	}{
		{RoleServer, p, clientv3.PermissionType(clientv3.PermReadWrite)},
		{RoleWorker, keys.OwnerPrefix(), clientv3.PermissionType(clientv3.PermRead)},
		{RoleWorker, p + "apps/", clientv3.PermissionType(clientv3.PermRead)},
		{RoleWorker, keys.ServerPrefix(), clientv3.PermissionType(clientv3.PermRead)},
	}
	for _, role := range []string{RoleServer, RoleWorker} {
		if _, err := root.RoleAdd(ctx, role); err != nil && !errors.Is(err, rpctypes.ErrRoleAlreadyExist) {
			return fmt.Errorf("coord: add role %s: %w", role, err)
		}
	}
	for _, g := range grants {
		if _, err := root.RoleGrantPermission(ctx, g.role, g.key, clientv3.GetPrefixRangeEnd(g.key), g.perm); err != nil {
			return fmt.Errorf("coord: grant %s on %s* to %s: %w", permName(g.perm), g.key, g.role, err)
		}
	}
	return nil
}

func permName(p clientv3.PermissionType) string {
	if p == clientv3.PermissionType(clientv3.PermReadWrite) {
		return "readwrite"
	}
	return "read"
}
