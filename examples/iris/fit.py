"""Fits a linear regression of petal width on petal length (Fisher's Iris data) into model.pkl."""

import pickle

from sklearn import datasets, metrics
from sklearn.linear_model import LinearRegression
from sklearn.model_selection import train_test_split

iris = datasets.load_iris()
petal_length = iris.data[:, [2]]
petal_width = iris.data[:, 3]

train_x, test_x, train_y, test_y = train_test_split(
    petal_length, petal_width, test_size=0.2, random_state=42
)
model = LinearRegression().fit(train_x, train_y)
predicted = model.predict(test_x)
print(f"mse={metrics.mean_squared_error(test_y, predicted):.4f} "
      f"r2={metrics.r2_score(test_y, predicted):.4f}")

with open("model.pkl", "wb") as f:
    pickle.dump(model, f)
print("wrote model.pkl")
